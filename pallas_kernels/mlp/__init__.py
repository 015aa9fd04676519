"""SwiGLU MLP: ``mlp(x, w_gate_up, w_down, impl=...)``.

Implementations: ``reference`` (plain JAX, autodiff) and ``fused`` (one matmul against the fused [gate|up] weight,
SwiGLU epilogue, down projection, and a hand-written VJP that keeps only ``x`` and the pre-activation in ``x``'s
dtype). ``auto`` picks ``fused`` on every platform (pure JAX: the CPU runs the same code as the GPU).
"""

from __future__ import annotations

from pallas_kernels._dispatch import REFERENCE, Registry
from pallas_kernels.mlp import fused, reference

FUSED = "fused"


def _auto(**_):
    return FUSED


registry = Registry("mlp", _auto)
registry.register(REFERENCE)(reference.mlp)
registry.register(FUSED)(fused.mlp)


def mlp(x, w_gate_up, w_down, *, impl: str = "auto"):
    """SwiGLU feed-forward block; see ``reference.py`` for layouts."""
    _, fn = registry.resolve(impl, x_shape=x.shape, w_shape=w_gate_up.shape, dtype=x.dtype)
    return fn(x, w_gate_up, w_down)
