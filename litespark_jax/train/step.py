"""The pure training and evaluation steps: ``train_step(state, batch) -> (state, metrics)``.

A batch is a dict of [batch, seq] arrays: ``inputs``, ``targets``, ``positions``, ``segment_ids`` and
``loss_mask``. The loss is the mean over unmasked target tokens of the whole global batch, also with gradient
accumulation: micro-batches sum their token losses and the sum is divided once by the total token count, so
accumulating N micro-batches equals one step on the large batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from litespark_jax.config import Config
from litespark_jax.errors import ConfigError
from litespark_jax.model import llama
from litespark_jax.parallel import kernels as sharded
from litespark_jax.train.state import TrainState


def token_loss_sum(params, graphdef, batch, *, z_loss_weight: float, impl: str):
    """(sum of masked per-token losses, number of unmasked tokens) for one (micro-)batch."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    loss_sum = sharded.cross_entropy_sum(hidden, model.output_weight(), batch["targets"], mask,
                                         z_loss_weight=z_loss_weight, impl=impl)
    return loss_sum, jnp.sum(mask)


def differentiable_params(params, model_cfg):
    """The tree the step differentiates: with ``cast_weights_once``, the layer matrices already cast to the compute
    dtype (``llama.cast_layer_matrices``), so their gradients are made and kept in that dtype; else ``params``."""
    if not model_cfg.cast_weights_once:
        return params
    return llama.cast_layer_matrices(params, model_cfg.dtype)


def split_micro_batches(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(config: Config, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)`` for this model and optimizer."""
    loss_kwargs = dict(z_loss_weight=config.train.z_loss_weight, impl=config.model.cross_entropy_impl)
    accum = config.train.grad_accum_steps
    offloaded = config.optim.offload_state
    grad_fn = jax.value_and_grad(lambda p, b: token_loss_sum(p, graphdef, b, **loss_kwargs), has_aux=True)

    def train_step(state: TrainState, batch):
        params = differentiable_params(state.params, config.model)
        if accum == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            def micro_step(carry, micro_batch):
                (loss_sum, count), grads = grad_fn(params, micro_batch)
                return jax.tree.map(jnp.add, carry, (loss_sum, count, grads)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, count, grads), _ = jax.lax.scan(micro_step, zeros, split_micro_batches(batch, accum))
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype) / denominator, grads, state.params)
        return apply_update(state, grads, {"loss": loss_sum / denominator, "tokens": count}, optimizer, schedule,
                            opt_state_on_host=offloaded)

    return train_step


def apply_update(state: TrainState, grads, metrics: dict, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule | None = None, opt_state_on_host: bool = False):
    """The optimizer update of ``grads`` (already the mean) under the numerical guard: ``(new state, metrics)`` with
    ``grad_norm``, ``learning_rate`` and ``nonfinite`` added to ``metrics`` (which holds the step's ``loss``).

    ``opt_state_on_host``: the moments arrive in pinned host memory (``optim.offload_state``) and are moved to the
    device here, for the update only; the jit's output shardings put the new moments back on the host."""
    old_opt_state = state.opt_state
    if opt_state_on_host:
        old_opt_state = jax.device_put(old_opt_state, jax.memory.Space.Device)
    updates, opt_state = optimizer.update(grads, old_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {**metrics, "grad_norm": grad_norm}
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    # Numerical guard, on device (no host sync): a non-finite loss or gradient leaves parameters and optimizer
    # state as they were; the step counter still advances so the data and the schedule stay aligned. The loop
    # reads "nonfinite" and stops or counts it (train.on_nonfinite).
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, old_opt_state))
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def compiler_options(config: Config) -> dict | None:
    """``train.xla_options`` for ``jax.jit(compiler_options=...)``, checked by compiling a trivial function with
    them: an unknown option or a bad value is a ConfigError naming it before the real step spends minutes compiling."""
    options = config.train.xla_options
    if not options:
        return None
    try:
        jax.jit(lambda: jnp.zeros(()), compiler_options=options).lower().compile()
    except (jax.errors.JaxRuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"train.xla_options: {' '.join(str(e).split())}") from None
    return dict(options)


def make_eval_step(config: Config, graphdef: nnx.GraphDef) -> Callable:
    """Build ``eval_step(params, batch) -> (loss_sum, token_count)``; no z-loss, so it is the plain NLL."""

    def eval_step(params, batch):
        return token_loss_sum(params, graphdef, batch, z_loss_weight=0.0, impl=config.model.cross_entropy_impl)

    return eval_step
