"""RMSNorm: ``rms_norm(x, scale, eps=..., impl=...)`` and ``rms_norm_and_skip`` for a pre-norm residual block.

Implementations: ``reference`` (plain JAX, autodiff), ``fused`` (same forward, hand-written VJP that saves only
``x`` and the float32 ``rstd``) and ``triton`` (GPU: the forward and the backward as one-pass Triton kernels through
jax-triton; ``triton_kernel.py``). ``auto`` picks ``triton`` for bf16 rows of up to 16384 where jax-triton and a GPU
are present (measured on an H100: docs/perf/kernels.md), else ``fused``.

``rms_norm_and_skip(x, scale)`` is ``(rms_norm(x, scale), x)``: a pre-norm block reads ``x`` twice, through the norm
and through the residual connection, and autodiff adds the two gradients. With ``triton`` that sum happens inside
the norm's backward kernel instead of in a separate pass over the activations.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _triton
from pallas_kernels._dispatch import REFERENCE, Registry
from pallas_kernels.rms_norm import fused, reference

FUSED = "fused"
TRITON = "triton"


def _auto(*, x_shape=None, dtype=None, **_):
    """``triton`` for bf16 rows it holds where jax-triton runs, else ``fused``. ``triton`` is a custom call: under a
    multi-device mesh, call it through ``litespark_jax.parallel.kernels`` (the model does)."""
    if x_shape is not None and jnp.dtype(dtype) == jnp.bfloat16 and _triton.available():
        from pallas_kernels.rms_norm import triton_kernel

        if triton_kernel.supported(x_shape[-1]):
            return TRITON
    return FUSED


def _triton_norm(x, scale, *, eps: float = 1e-5):
    from pallas_kernels.rms_norm import triton_kernel  # needs triton: imported only when asked for

    return triton_kernel.rms_norm(x, scale, eps=eps)


def _triton_norm_and_skip(x, scale, *, eps: float = 1e-5):
    from pallas_kernels.rms_norm import triton_kernel

    return triton_kernel.rms_norm_and_skip(x, scale, eps=eps)


registry = Registry("rms_norm", _auto)
registry.register(REFERENCE)(reference.rms_norm)
registry.register(FUSED)(fused.rms_norm)
registry.register(TRITON, available=_triton.available,
                  needs="a GPU where jax-triton imports (jax-triton 0.3.1 with triton 3.6)")(_triton_norm)

# Implementations with their own (norm, skip) pair; the others get autodiff's sum of the two gradients.
_NORM_AND_SKIP = {TRITON: _triton_norm_and_skip}


def rms_norm(x, scale, *, eps: float = 1e-5, impl: str = "auto"):
    """Root-mean-square layer norm; see ``reference.py``."""
    _, fn = registry.resolve(impl, x_shape=x.shape, dtype=x.dtype)
    return fn(x, scale, eps=eps)


def rms_norm_and_skip(x, scale, *, eps: float = 1e-5, impl: str = "auto"):
    """``(rms_norm(x, scale), x)``: the normalized input of a pre-norm block and its residual stream."""
    name, fn = registry.resolve(impl, x_shape=x.shape, dtype=x.dtype)
    if name in _NORM_AND_SKIP:
        return _NORM_AND_SKIP[name](x, scale, eps=eps)
    return fn(x, scale, eps=eps), x
