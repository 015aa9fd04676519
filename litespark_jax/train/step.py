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


def make_gradients(config: Config, graphdef: nnx.GraphDef) -> Callable:
    """``gradients(params, batch) -> (grad_sums, denominator, metrics)``: the gradients of the summed token losses
    (bf16 for the layer matrices with ``cast_weights_once``), the token count they are divided by, and the step's
    ``loss`` and ``tokens``."""
    loss_kwargs = dict(z_loss_weight=config.train.z_loss_weight, impl=config.model.cross_entropy_impl)
    accum = config.train.grad_accum_steps
    grad_fn = jax.value_and_grad(lambda p, b: token_loss_sum(p, graphdef, b, **loss_kwargs), has_aux=True)

    def gradients(state_params, batch):
        params = differentiable_params(state_params, config.model)
        if accum == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            def micro_step(carry, micro_batch):
                (loss_sum, count), grads = grad_fn(params, micro_batch)
                return jax.tree.map(jnp.add, carry, (loss_sum, count, grads)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state_params))
            (loss_sum, count, grads), _ = jax.lax.scan(micro_step, zeros, split_micro_batches(batch, accum))
        denominator = jnp.maximum(count, 1.0)
        return grads, denominator, {"loss": loss_sum / denominator, "tokens": count}

    return gradients


def mean_gradients(grad_sums, denominator, params):
    """The gradients the optimizer reads: in the parameters' dtype, divided by the step's token (or pair) count."""
    return jax.tree.map(lambda g, p: g.astype(p.dtype) / denominator, grad_sums, params)


def make_train_step(config: Config, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)`` for this model and optimizer, one program with the
    moments on the device (``optim.offload_state`` runs ``offload.StreamedOffloadStep`` instead)."""
    return step_from_gradients(make_gradients(config, graphdef), optimizer, schedule)


def step_from_gradients(gradients: Callable, optimizer: optax.GradientTransformation,
                        schedule: optax.Schedule | None = None) -> Callable:
    """``train_step(state, batch)``: ``gradients`` (as ``make_gradients``'s) then the update under the guard."""

    def train_step(state: TrainState, batch):
        grad_sums, denominator, metrics = gradients(state.params, batch)
        grads = mean_gradients(grad_sums, denominator, state.params)
        return apply_update(state, grads, metrics, optimizer, schedule)

    return train_step


def apply_update(state: TrainState, grads, metrics: dict, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule | None = None):
    """The optimizer update of ``grads`` (already the mean) under the numerical guard: ``(new state, metrics)`` with
    ``grad_norm``, ``learning_rate`` and ``nonfinite`` added to ``metrics`` (which holds the step's ``loss``)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, **step_scalars(state.step, grads, metrics, schedule)}
    # Numerical guard, on device (no host sync): a non-finite loss or gradient leaves parameters and optimizer
    # state as they were; the step counter still advances so the data and the schedule stay aligned. The loop
    # reads "nonfinite" and stops or counts it (train.on_nonfinite).
    finite = metrics["nonfinite"] == 0
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def step_scalars(step, grads, metrics: dict, schedule: optax.Schedule | None) -> dict:
    """``grad_norm`` of the mean gradients, ``learning_rate`` of this step and the guard's ``nonfinite`` (1.0 when
    the loss or the gradient norm is not finite)."""
    grad_norm = optax.tree.norm(grads)
    out = {"grad_norm": grad_norm}
    if schedule is not None:
        out["learning_rate"] = schedule(step)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    out["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
    return out


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
