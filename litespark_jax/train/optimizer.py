"""AdamW with warmup + cosine decay, global-norm clipping, and no weight decay on norms or biases."""

from __future__ import annotations

from typing import NamedTuple

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


class AdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, state_dtype) -> optax.GradientTransformation:
    """Adam's moment scaling with both moments stored in ``state_dtype`` and the arithmetic in float32.

    optax's own ``scale_by_adam`` only lets the first moment be stored in a narrower dtype; on one 80 GB GPU the
    second moment in bfloat16 is what frees the memory a 3B model needs to keep its activations.
    """
    state_dtype = jnp.dtype(state_dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), state_dtype)
        return AdamState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                         nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        f32 = lambda x: x.astype(jnp.float32)
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
        count = state.count + 1
        mu_hat_scale = 1.0 / (1.0 - b1 ** count.astype(jnp.float32))
        nu_hat_scale = 1.0 / (1.0 - b2 ** count.astype(jnp.float32))
        updates = jax.tree.map(
            lambda g, m, v: (m * mu_hat_scale / (jnp.sqrt(v * nu_hat_scale) + eps)).astype(g.dtype), updates, mu, nu)
        cast = lambda t: jax.tree.map(lambda x: x.astype(state_dtype), t)
        return updates, AdamState(count=count, mu=cast(mu), nu=cast(nu))

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (``cfg.grad_clip`` > 0) chained before ``elementwise_optimizer``'s transforms."""
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, *_elementwise_transforms(cfg, total_steps))


def elementwise_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``build_optimizer`` without its clipping: every transform acts on each parameter alone, so it can update one
    parameter at a time (``litespark_jax.train.offload``). Its state is the full optimizer's state without the
    clipping's, ``elementwise_state(cfg, opt_state)``."""
    return optax.chain(*_elementwise_transforms(cfg, total_steps))


def elementwise_state(cfg: OptimConfig, opt_state: tuple) -> tuple:
    """The part of ``build_optimizer``'s chain state that ``elementwise_optimizer`` reads and writes."""
    return opt_state[1:] if cfg.grad_clip > 0 else opt_state


def with_elementwise_state(cfg: OptimConfig, opt_state: tuple, new_elementwise_state: tuple) -> tuple:
    """``opt_state`` with its ``elementwise_state`` part replaced by ``new_elementwise_state``."""
    return (opt_state[0], *new_elementwise_state) if cfg.grad_clip > 0 else tuple(new_elementwise_state)


def _elementwise_transforms(cfg: OptimConfig, total_steps: int) -> list[optax.GradientTransformation]:
    if jnp.dtype(cfg.state_dtype) == jnp.float32:
        adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        adam = scale_by_adam(cfg.b1, cfg.b2, cfg.eps, cfg.state_dtype)
    return [
        adam,
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)),
    ]
