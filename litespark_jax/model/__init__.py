"""Flax NNX Llama: ``Llama(cfg, rngs=...)`` and its blocks."""

from litespark_jax.model.layers import ACTIVATION_NAMES, MLP, Attention, DecoderLayer, RMSNorm
from litespark_jax.model.llama import Llama

__all__ = ["ACTIVATION_NAMES", "MLP", "Attention", "DecoderLayer", "Llama", "RMSNorm"]
