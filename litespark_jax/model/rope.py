"""Rotary position embeddings (RoPE), with Llama-3 frequency scaling.

Uses the half-split layout of Hugging Face's Llama (``rotate_half``): dimension ``i`` pairs with ``i + head_dim/2``.
Positions are per document in packed sequences, so each document starts again at 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The ``head_dim/2`` rotation frequencies, float64 numpy (computed once, outside jit)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(
        wavelen > low_freq_wavelen,
        inv_freq / factor,
        np.where(wavelen < high_freq_wavelen, inv_freq, interpolated),
    )


def apply_rope(x, positions, inv_freq):
    """Rotate ``x`` [batch, seq, heads, head_dim] by ``positions`` [batch, seq]; computed in float32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [b, s, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
