"""RMSNorm as two Triton kernels (called through jax-triton), forward and backward each one pass over the rows.

Why: XLA runs the norm's backward as several fusions (the row statistic ``mean(gn * n)``, then ``dx``, then the
weight gradient's column sums, each re-reading ``x`` and ``dy``), and the residual stream's gradient is added in
yet another pass. Here the forward reads ``x`` once and writes ``y`` and the float32 per-row ``rstd``; the backward
reads ``x``, ``dy`` and (for ``rms_norm_and_skip``) the residual stream's gradient once, writes ``dx``, and keeps the
weight gradient's column sums in registers across the rows each program owns (one [programs, d] float32 partial,
summed by XLA).

Arithmetic is ``fused.py``'s: forward ``scale.astype(x.dtype) * (x * rstd).astype(x.dtype)``, backward in float32
with ``n = x * rstd``, ``gn = dy * scale``, ``dx = rstd * (gn - n * mean(gn * n))``, ``dscale = sum(dy * n)``.
Rows of up to ``MAX_COLS`` columns fit one program's registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels import _triton
from pallas_kernels.rms_norm import fused

MAX_COLS = 16384
BACKWARD_PROGRAMS = 528  # 4 per SM on an H100 SXM (132 SMs): each sums its rows' weight gradient in registers


@triton.jit
def rms_norm_forward_triton(x_ptr, scale_ptr, y_ptr, rstd_ptr, n_cols: tl.constexpr, eps: tl.constexpr,
                            block: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, block)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    dtype = y_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
    normed = (x * rstd).to(dtype).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (scale * normed).to(dtype), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def rms_norm_backward_triton(dy_ptr, x_ptr, scale_ptr, rstd_ptr, dskip_ptr, dx_ptr, dscale_ptr,
                             n_rows: tl.constexpr, n_cols: tl.constexpr, add_skip: tl.constexpr, block: tl.constexpr):
    """Program p handles rows p, p + P, p + 2P, ...; ``dskip`` (the gradient of the residual stream that also read
    ``x``) is added into ``dx`` when ``add_skip``."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, block)
    mask = cols < n_cols
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dscale = tl.zeros([block], dtype=tl.float32)
    for row in range(pid, n_rows, programs):
        offset = tl.cast(row, tl.int64) * n_cols + cols
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        gn = dy * scale
        dx = rstd * (gn - n * (tl.sum(gn * n, axis=0) / n_cols))
        if add_skip:
            dx += tl.load(dskip_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offset, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dscale += dy * n
    tl.store(dscale_ptr + pid * n_cols + cols, dscale, mask=mask)


def supported(n_cols: int) -> bool:
    return n_cols <= MAX_COLS


def _block(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _warps(n_cols: int) -> int:
    return 4 if n_cols <= 1024 else 8 if n_cols <= 4096 else 16


def _forward(x2, scale, eps, interpret):
    n_rows, n_cols = x2.shape
    out_shape = (jax.ShapeDtypeStruct(x2.shape, x2.dtype), jax.ShapeDtypeStruct((n_rows,), jnp.float32))
    return _triton.call(rms_norm_forward_triton, x2, scale, out_shape=out_shape, grid=(n_rows,), interpret=interpret,
                        num_warps=_warps(n_cols), n_cols=n_cols, eps=float(eps), block=_block(n_cols))


def _backward(dy, x2, scale, rstd, dskip, interpret):
    n_rows, n_cols = x2.shape
    programs = min(n_rows, BACKWARD_PROGRAMS)
    out_shape = (jax.ShapeDtypeStruct(x2.shape, x2.dtype), jax.ShapeDtypeStruct((programs, n_cols), jnp.float32))
    add_skip = dskip is not None
    dx, partial = _triton.call(
        rms_norm_backward_triton, dy.astype(x2.dtype), x2, scale, rstd, dskip.astype(x2.dtype) if add_skip else dy,
        out_shape=out_shape, grid=(programs,), interpret=interpret, num_warps=_warps(n_cols), n_rows=n_rows,
        n_cols=n_cols, add_skip=add_skip, block=_block(n_cols))
    return dx, jnp.sum(partial, axis=0).astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _norm(x2, scale, eps, interpret):
    return _forward(x2, scale, eps, interpret)[0]


def _norm_fwd(x2, scale, eps, interpret):
    y, rstd = _forward(x2, scale, eps, interpret)
    return y, (x2, scale, rstd)


def _norm_bwd(eps, interpret, res, dy):
    x2, scale, rstd = res
    return _backward(dy, x2, scale, rstd, None, interpret)


_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _norm_and_skip(x2, scale, eps, interpret):
    return _forward(x2, scale, eps, interpret)[0], x2


def _norm_and_skip_fwd(x2, scale, eps, interpret):
    y, rstd = _forward(x2, scale, eps, interpret)
    return (y, x2), (x2, scale, rstd)


def _norm_and_skip_bwd(eps, interpret, res, cotangents):
    x2, scale, rstd = res
    dy, dskip = cotangents
    return _backward(dy, x2, scale, rstd, dskip, interpret)


_norm_and_skip.defvjp(_norm_and_skip_fwd, _norm_and_skip_bwd)


def rms_norm(x, scale, *, eps: float = 1e-5, interpret: bool = False):
    """Same contract as ``reference.rms_norm``; rows wider than ``MAX_COLS`` go to ``fused``."""
    if not supported(x.shape[-1]):
        return fused.rms_norm(x, scale, eps=eps)
    y = _norm(x.reshape(-1, x.shape[-1]), scale, float(eps), bool(interpret))
    return y.reshape(x.shape)


def rms_norm_and_skip(x, scale, *, eps: float = 1e-5, interpret: bool = False):
    """``(rms_norm(x, scale), x)``, with the two gradients that reach ``x`` summed inside the backward kernel."""
    if not supported(x.shape[-1]):
        return fused.rms_norm(x, scale, eps=eps), x
    y, skip = _norm_and_skip(x.reshape(-1, x.shape[-1]), scale, float(eps), bool(interpret))
    return y.reshape(x.shape), skip.reshape(x.shape)
