"""Rematerialization policies: what a layer keeps for the backward pass and what it recomputes."""

from __future__ import annotations

import jax

from litespark_jax.config import ModelConfig


def remat_policy(cfg: ModelConfig):
    """The ``jax.checkpoint`` policy for ``cfg.remat_policy``, or None for no rematerialization."""
    policies = jax.checkpoint_policies
    if cfg.remat_policy == "none":
        return None
    if cfg.remat_policy == "full":
        return policies.nothing_saveable
    if cfg.remat_policy == "save_matmuls":
        return policies.dots_with_no_batch_dims_saveable
    if cfg.remat_policy == "save_attention":
        return policies.save_only_these_names("attention_out")
    return policies.save_only_these_names(*cfg.remat_save_names)


def maybe_remat(fn, cfg: ModelConfig):
    """Wrap a layer function in ``jax.checkpoint`` according to the configured policy."""
    policy = remat_policy(cfg)
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=not cfg.scan_layers)
