"""Linear cross-entropy, per token and as the weighted sum a training loss is.

``cross_entropy(x, w, targets, z_loss_weight=..., impl=...)`` gives the per-token loss. Implementations:
``reference`` (materializes the float32 logits) and ``chunked`` (pure-JAX fused projection + log-softmax + NLL over
vocabulary chunks with a custom VJP; never materializes the logits). ``auto`` picks ``chunked`` on every platform
once the float32 logits would exceed 64 MiB (it is pure JAX, so the CPU runs the same code as the GPU, and it needs
a small fraction of the memory), and ``reference`` for smaller problems.

``cross_entropy_sum(x, w, targets, weights, ...)`` gives ``sum(weights * loss)``, the training loss (weights: the
loss mask). Besides ``reference`` and ``chunked`` (their per-token losses, summed) it has ``single_pass``, which
forms the gradients in the forward pass over token chunks and so needs three vocabulary matmuls instead of
``chunked``'s four, for a float32 [d, V] accumulator more; ``auto`` picks it where it would pick ``chunked``.
Per-token losses have no single-pass form (their cotangent is not known in the forward), so ``cross_entropy``
given ``impl="single_pass"`` (one loss setting for training and DPO) runs ``chunked``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels._dispatch import REFERENCE, Registry
from pallas_kernels.cross_entropy import chunked, reference, single_pass

CHUNKED = "chunked"
SINGLE_PASS = "single_pass"
_CHUNKED_MIN_LOGIT_BYTES = 64 * 1024 * 1024


def _auto(x_shape, w_shape, **_):
    n_tokens = math.prod(x_shape[:-1])
    return CHUNKED if 4 * n_tokens * w_shape[1] >= _CHUNKED_MIN_LOGIT_BYTES else REFERENCE


registry = Registry("cross_entropy", _auto)
registry.register(REFERENCE)(reference.cross_entropy)
registry.register(CHUNKED)(chunked.cross_entropy)


def cross_entropy(x, w, targets, *, z_loss_weight: float = 0.0, impl: str = "auto"):
    """Per-token loss of the vocabulary projection of ``x``; see ``reference.py``."""
    _, fn = registry.resolve(CHUNKED if impl == SINGLE_PASS else impl, x_shape=x.shape, w_shape=w.shape,
                             dtype=x.dtype)
    return fn(x, w, targets, z_loss_weight=z_loss_weight)


def _auto_sum(x_shape, w_shape, **_):
    return SINGLE_PASS if _auto(x_shape, w_shape) == CHUNKED else REFERENCE


def summed(per_token):
    """``(x, w, targets, weights, *, z_loss_weight)`` -> ``sum(weights * per_token(...))``: a per-token loss as the
    weighted-sum contract of ``cross_entropy_sum``."""

    def loss_sum(x, w, targets, weights, *, z_loss_weight: float = 0.0):
        return jnp.sum(weights.astype(jnp.float32) * per_token(x, w, targets, z_loss_weight=z_loss_weight))

    loss_sum.__doc__ = f"``sum(weights * loss)`` with the per-token losses of ``{per_token.__module__}``."
    return loss_sum


sum_registry = Registry("cross_entropy_sum", _auto_sum)
sum_registry.register(REFERENCE)(summed(reference.cross_entropy))
sum_registry.register(CHUNKED)(summed(chunked.cross_entropy))
sum_registry.register(SINGLE_PASS)(single_pass.cross_entropy_sum)


def cross_entropy_sum(x, w, targets, weights, *, z_loss_weight: float = 0.0, impl: str = "auto"):
    """``sum(weights * loss)``, float32 scalar, of the vocabulary projection of ``x`` (``weights``: the shape of
    ``targets``, e.g. the loss mask); differentiable in ``x``, ``w`` and ``weights``."""
    _, fn = sum_registry.resolve(impl, x_shape=x.shape, w_shape=w.shape, dtype=x.dtype)
    return fn(x, w, targets, weights, z_loss_weight=z_loss_weight)
