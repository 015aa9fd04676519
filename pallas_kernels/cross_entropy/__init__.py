"""Linear cross-entropy: ``cross_entropy(x, w, targets, z_loss_weight=..., impl=...)``.

Implementations: ``reference`` (materializes the float32 logits) and ``chunked`` (pure-JAX fused projection +
log-softmax + NLL over vocabulary chunks with a custom VJP; never materializes the logits). ``auto`` picks
``chunked`` on every platform once the float32 logits would exceed 64 MiB (it is pure JAX, so the CPU runs the same
code as the GPU, and it needs a small fraction of the memory), and ``reference`` for smaller problems.
"""

from __future__ import annotations

import math

from pallas_kernels._dispatch import REFERENCE, Registry
from pallas_kernels.cross_entropy import chunked, reference

CHUNKED = "chunked"
_CHUNKED_MIN_LOGIT_BYTES = 64 * 1024 * 1024


def _auto(x_shape, w_shape, **_):
    n_tokens = math.prod(x_shape[:-1])
    return CHUNKED if 4 * n_tokens * w_shape[1] >= _CHUNKED_MIN_LOGIT_BYTES else REFERENCE


registry = Registry("cross_entropy", _auto)
registry.register(REFERENCE)(reference.cross_entropy)
registry.register(CHUNKED)(chunked.cross_entropy)


def cross_entropy(x, w, targets, *, z_loss_weight: float = 0.0, impl: str = "auto"):
    """Per-token loss of the vocabulary projection of ``x``; see ``reference.py``."""
    _, fn = registry.resolve(impl, x_shape=x.shape, w_shape=w.shape, dtype=x.dtype)
    return fn(x, w, targets, z_loss_weight=z_loss_weight)
