"""RMSNorm: ``rms_norm(x, scale, eps=..., impl=...)``.

Implementations: ``reference`` (plain JAX, autodiff) and ``fused`` (same forward, hand-written VJP that saves only
``x`` and the float32 ``rstd``). ``auto`` picks ``fused`` on every platform (pure JAX).
"""

from __future__ import annotations

from pallas_kernels._dispatch import REFERENCE, Registry
from pallas_kernels.rms_norm import fused, reference

FUSED = "fused"


def _auto(**_):
    return FUSED


registry = Registry("rms_norm", _auto)
registry.register(REFERENCE)(reference.rms_norm)
registry.register(FUSED)(fused.rms_norm)


def rms_norm(x, scale, *, eps: float = 1e-5, impl: str = "auto"):
    """Root-mean-square layer norm; see ``reference.py``."""
    _, fn = registry.resolve(impl, x_shape=x.shape, dtype=x.dtype)
    return fn(x, scale, eps=eps)
