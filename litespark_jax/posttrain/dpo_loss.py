"""Direct preference optimization: per-token log-probs through the fused loss kernel, the DPO/IPO loss, the step.

With policy pi, reference pi_ref, chosen y_w and rejected y_l of prompt x, and the summed response log-probs
``log pi(y|x)``, the log-ratio margin is

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

- sigmoid (Rafailov et al. 2023, eq. 7), with conservative label smoothing eps (Mitchell 2023):
  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
- ipo (Azar et al. 2023, eq. 17 with summed log-probs): loss = (h - 1 / (2 beta))^2

The implicit rewards are r = beta (log pi - log pi_ref) of each side; we log their accuracy (the fraction of pairs
with r_w > r_l), margin (mean r_w - r_l), and a KL proxy: the mean over both sides of log pi - log pi_ref per
sequence (not a true KL, as the responses are not samples of pi; it shows how far the policy has moved).

Per-token log-probs are the negated per-token loss of ``pallas_kernels.cross_entropy`` (no z-loss), so DPO runs on
the same fused kernel (never materializing the logits), attention kernel and sharding as pretraining.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import pallas_kernels
from litespark_jax.train.state import TrainState
from litespark_jax.train.step import differentiable_params, split_micro_batches, step_from_gradients


def token_logps(params, graphdef, batch, *, impl: str = "auto"):
    """[rows, seq] log-prob of each target token under the model, 0 where ``loss_mask`` is 0."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    per_token = pallas_kernels.cross_entropy(hidden, model.output_weight(), batch["targets"], z_loss_weight=0.0,
                                             impl=impl)
    return -per_token.astype(jnp.float32) * batch["loss_mask"].astype(jnp.float32)


def pair_losses(policy_logps, ref_logps, *, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Per-pair losses and rewards from per-sequence log-probs [2P] (chosen at even, rejected at odd indices)."""
    policy_ratio = policy_logps - ref_logps
    chosen, rejected = policy_ratio[0::2], policy_ratio[1::2]
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen, beta * rejected


def dpo_sums(params, graphdef, batch, *, beta: float, label_smoothing: float, loss_type: str, impl: str):
    """Sums over the valid pairs of one (micro-)batch: (loss, (pairs, reward stats...)). Pairs whose chosen row has
    no response token (batch padding) count for nothing."""
    policy = jnp.sum(token_logps(params, graphdef, batch, impl=impl), axis=-1)
    ref = jnp.sum(batch["ref_logps"].astype(jnp.float32) * batch["loss_mask"], axis=-1)
    losses, r_chosen, r_rejected = pair_losses(policy, ref, beta=beta, label_smoothing=label_smoothing,
                                               loss_type=loss_type)
    valid = (jnp.sum(batch["loss_mask"][0::2], axis=-1) > 0).astype(jnp.float32)
    stats = {
        "pairs": jnp.sum(valid),
        "reward_accuracy": jnp.sum(valid * (r_chosen > r_rejected)),
        "reward_margin": jnp.sum(valid * (r_chosen - r_rejected)),
        "chosen_reward": jnp.sum(valid * r_chosen),
        "rejected_reward": jnp.sum(valid * r_rejected),
        "kl_proxy": jnp.sum(valid * (r_chosen + r_rejected)) / (2.0 * beta),
        "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
    }
    return jnp.sum(valid * losses), stats


def _means(loss_sum, stats):
    pairs = jnp.maximum(stats["pairs"], 1.0)
    out = {k: v / pairs for k, v in stats.items() if k not in ("pairs", "tokens")}
    return {"loss": loss_sum / pairs, **out, "pairs": stats["pairs"], "tokens": stats["tokens"]}


def make_dpo_gradients(posttrain_cfg, model_cfg, grad_accum_steps: int, graphdef) -> Callable:
    """``gradients(params, batch) -> (grad_sums, pairs, metrics)`` as ``train.step.make_gradients``, for the DPO
    loss: ``batch["ref_logps"]`` holds the reference's per-token log-probs; the loss is the mean over the global
    batch's pairs, also with gradient accumulation."""
    kwargs = dict(beta=posttrain_cfg.beta, label_smoothing=posttrain_cfg.label_smoothing,
                  loss_type=posttrain_cfg.loss_type, impl=model_cfg.cross_entropy_impl)
    grad_fn = jax.value_and_grad(lambda p, b: dpo_sums(p, graphdef, b, **kwargs), has_aux=True)

    def gradients(state_params, batch):
        params = differentiable_params(state_params, model_cfg)  # bf16 layer gradients, as the train step
        if grad_accum_steps == 1:
            (loss_sum, stats), grads = grad_fn(params, batch)
        else:
            micro = split_micro_batches(batch, grad_accum_steps)

            def micro_step(carry, micro_batch):
                return jax.tree.map(jnp.add, carry, grad_fn(params, micro_batch)), None

            # The carry has the float32 parameters' shapes and dtypes: bf16 gradients accumulate in float32.
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, state_params,
                                                               jax.tree.map(lambda x: x[0], micro)))
            ((loss_sum, stats), grads), _ = jax.lax.scan(micro_step, zeros, micro)
        return grads, jnp.maximum(stats["pairs"], 1.0), _means(loss_sum, stats)

    return gradients


def make_dpo_step(posttrain_cfg, model_cfg, grad_accum_steps: int, graphdef, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule | None = None) -> Callable:
    """``dpo_step(state, batch) -> (state, metrics)``: ``make_dpo_gradients`` then the optimizer update."""
    return step_from_gradients(make_dpo_gradients(posttrain_cfg, model_cfg, grad_accum_steps, graphdef), optimizer,
                               schedule)


def make_dpo_eval(posttrain_cfg, model_cfg, graphdef) -> Callable:
    """``dpo_eval(params, batch) -> (loss_sum, stats sums)`` for accumulating over an eval set."""
    kwargs = dict(beta=posttrain_cfg.beta, label_smoothing=posttrain_cfg.label_smoothing,
                  loss_type=posttrain_cfg.loss_type, impl=model_cfg.cross_entropy_impl)
    return lambda params, batch: dpo_sums(params, graphdef, batch, **kwargs)
