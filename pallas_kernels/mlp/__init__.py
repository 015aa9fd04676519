"""SwiGLU MLP: ``mlp(x, w_gate_up, w_down, impl=...)``.

Implementations: ``reference`` (plain JAX, autodiff) and ``fused`` (one matmul against the fused [gate|up] weight,
SwiGLU epilogue, down projection, and a hand-written VJP that keeps only ``x`` and the pre-activation in ``x``'s
dtype), ``fused_bf16`` (the same, with the gate/up matmul's output rounded to ``x``'s dtype before the SwiGLU
epilogue, as a cuBLAS bf16 step does: half the epilogue's memory traffic, but 1.5% slower end to end on the 3B),
``fused_tp`` (the same with 3-D einsums, so a tensor-parallel ``f`` axis stays sharded instead of the gate/up weight
being all-gathered; untimed on a GPU), ``mosaic_gpu`` (Hopper only: the gate/up matmul with the SwiGLU epilogue
as a Pallas Mosaic GPU kernel, backward as ``fused``; passes its GPU test on an H100), and
``mosaic_gpu_fused_bwd`` (the same with the backward's ``dh`` matmul and SwiGLU gradient as one Pallas kernel,
``mosaic_gpu_bwd.py``: correct on an H100 but slower than XLA's backward, so never ``auto``) and
``mosaic_gpu_triton_bwd`` (``mosaic_gpu`` with the backward's SwiGLU gradient as one Triton pass through jax-triton,
``triton_kernel.py``). ``auto`` picks ``mosaic_gpu_triton_bwd`` on Hopper where it tiles and jax-triton is
installed, ``mosaic_gpu`` without jax-triton, else ``fused`` (pure JAX: the CPU runs the same code as the GPU),
which runs forward+backward 1.8x faster than autodiff of the reference on an H100 (docs/perf/kernels.md).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from pallas_kernels import _triton
from pallas_kernels._dispatch import REFERENCE, Registry, is_hopper
from pallas_kernels.mlp import fused, mosaic_gpu, reference

FUSED = "fused"
FUSED_BF16 = "fused_bf16"
FUSED_TP = "fused_tp"
MOSAIC_GPU = "mosaic_gpu"
MOSAIC_GPU_FUSED_BWD = "mosaic_gpu_fused_bwd"
MOSAIC_GPU_TRITON_BWD = "mosaic_gpu_triton_bwd"


def _auto(*, x_shape=None, w_shape=None, dtype=None, **_):
    """On Hopper, for bf16 shapes the Pallas kernel tiles: ``mosaic_gpu_triton_bwd`` where jax-triton runs, else
    ``mosaic_gpu`` (measured on an H100: ``mosaic_gpu`` +2.8% end to end on the 3B step over ``fused``, the Triton
    backward +1.0% more; docs/perf/kernels.md). Elsewhere ``fused``. Both are custom calls, which the SPMD
    partitioner cannot split: under a multi-device mesh, call them through ``litespark_jax.parallel.kernels.mlp``
    (the model does), which runs them per device or falls back to ``fused``."""
    if x_shape is not None and w_shape is not None and jnp.dtype(dtype) == jnp.bfloat16 and is_hopper():
        m = math.prod(x_shape[:-1])
        if mosaic_gpu.supported(m, x_shape[-1], w_shape[2]):
            return MOSAIC_GPU_TRITON_BWD if _triton.available() else MOSAIC_GPU
    return FUSED


registry = Registry("mlp", _auto)
registry.register(REFERENCE)(reference.mlp)
registry.register(FUSED)(fused.mlp)
registry.register(FUSED_BF16)(functools.partial(fused.mlp, gate_up_f32=False))
registry.register(FUSED_TP)(fused.mlp_tp)
_HOPPER = "an NVIDIA Hopper GPU (compute capability 9.x)"
registry.register(MOSAIC_GPU, available=is_hopper, needs=_HOPPER)(mosaic_gpu.mlp)
registry.register(MOSAIC_GPU_FUSED_BWD, available=is_hopper, needs=_HOPPER)(mosaic_gpu.mlp_fused_backward)
registry.register(MOSAIC_GPU_TRITON_BWD, available=lambda: is_hopper() and _triton.available(),
                  needs=f"{_HOPPER} and jax-triton (0.3.1 with triton 3.6)")(mosaic_gpu.mlp_triton_backward)


def mlp(x, w_gate_up, w_down, *, impl: str = "auto"):
    """SwiGLU feed-forward block; see ``reference.py`` for layouts."""
    _, fn = registry.resolve(impl, x_shape=x.shape, w_shape=w_gate_up.shape, dtype=x.dtype)
    return fn(x, w_gate_up, w_down)
