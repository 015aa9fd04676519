"""The SwiGLU backward's elementwise part as one Triton kernel (called through jax-triton).

``fused.swiglu_backward`` leaves XLA two passes that share nothing: ``dgu`` (reads ``dh`` and the [N, 2, f]
pre-activation, writes ``dgu``) and ``h`` for the down projection's weight gradient (reads the pre-activation again).
That is 8 bf16 [N, f] arrays of traffic; this kernel reads ``dh``, ``gate`` and ``up`` once and writes ``dgate``,
``dup`` and ``h``: 6. Same arithmetic (float32, one sigmoid per element), outputs in ``dh``'s dtype.
"""

from __future__ import annotations

import jax
import triton
import triton.language as tl

from pallas_kernels import _triton

BLOCK = 1024  # columns per program: 8 bf16 (16 bytes) per thread of 4 warps


@triton.jit
def swiglu_backward_triton(gu_ptr, dh_ptr, dgu_ptr, h_ptr, f: tl.constexpr, block: tl.constexpr):
    row = tl.cast(tl.program_id(0), tl.int64)
    cols = tl.program_id(1) * block + tl.arange(0, block)
    mask = cols < f
    gate_at = gu_ptr + row * (2 * f) + cols
    g = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_at + f, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * f + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dtype = dgu_ptr.dtype.element_ty
    dgate_at = dgu_ptr + row * (2 * f) + cols
    tl.store(dgate_at, (dh * u * (sig * (1.0 + g * (1.0 - sig)))).to(dtype), mask=mask)
    tl.store(dgate_at + f, (dh * silu).to(dtype), mask=mask)
    tl.store(h_ptr + row * f + cols, (silu * u).to(dtype), mask=mask)


def swiglu_backward(gu, dh, *, interpret: bool = False):
    """(dgu [N, 2, f], h [N, f]) from the pre-activation ``gu`` [N, 2, f] and ``dh`` [N, f]; ``fused.swiglu_backward``'s
    contract."""
    n, _, f = gu.shape
    out_shape = (jax.ShapeDtypeStruct(gu.shape, dh.dtype), jax.ShapeDtypeStruct(dh.shape, dh.dtype))
    return _triton.call(swiglu_backward_triton, gu, dh, out_shape=out_shape, grid=(n, triton.cdiv(f, BLOCK)),
                        interpret=interpret, num_warps=4, f=f, block=BLOCK)
