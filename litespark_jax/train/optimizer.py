"""AdamW with warmup + cosine decay, global-norm clipping, and no weight decay on norms or biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from litespark_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + decay_steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _decays(path) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any("norm" in n or "bias" in n for n in names)


def weight_decay_mask(params):
    """True for parameters that get weight decay: every matrix, never a norm scale or a bias."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), params)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    chain = []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
            mu_dtype=jnp.dtype(cfg.state_dtype),
        )
    )
    return optax.chain(*chain)
