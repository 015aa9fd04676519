"""RMSNorm: every registered impl against an independent float64 numpy forward and backward (x and scale).

The Triton kernels (GPU impl ``triton``) also run here, in Triton's interpreter on the CPU (tests/conftest.py sets
``TRITON_INTERPRET=1``), through their JAX custom VJPs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import registry, rms_norm, rms_norm_and_skip

gpu = pytest.mark.gpu  # tests/conftest.py skips these without a GPU (LITESPARK_TEST_GPU=1 runs them)
_seed = iter(range(10_000))


def _np_rms(x, scale, dy, eps):
    x, scale, dy = (np.asarray(a, np.float64) for a in (x, scale, dy))
    rstd = 1 / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)
    n = x * rstd
    gn = dy * scale
    dx = rstd * (gn - n * np.mean(gn * n, -1, keepdims=True))
    return n * scale, dx, np.sum((dy * n).reshape(-1, x.shape[-1]), 0)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(shape, dtype, scale_dtype=None):
    rng = np.random.default_rng(next(_seed))
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 0.5, dtype)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(shape[-1]), scale_dtype or dtype)
    keep = rng.random((*shape[:-1], 1)) > 0.25
    dy = jnp.asarray(rng.standard_normal(shape) * keep, dtype)
    return x, scale, dy, rng


def _check(fn, shape, dtype, tol, eps=1e-5, scale_dtype=None):
    x, scale, dy, _ = _inputs(shape, dtype, scale_dtype)

    def fb(x, scale, dy):
        y, vjp = jax.vjp(lambda x, s: fn(x, s, eps=eps), x, scale)
        return (y, *vjp(dy))

    got = jax.jit(fb)(x, scale, dy)
    want = _np_rms(x, scale, dy, eps)
    for a, b, like in zip(got, want, (x, x, scale)):
        assert a.shape == b.shape == like.shape and a.dtype == like.dtype
        err = _rel(a, b)
        assert err < tol, (err, tol)


def _check_skip(fn, shape, dtype, tol, eps=1e-5):
    """``fn`` = (norm(x), x): the gradient of x is the norm's plus the skip cotangent's."""
    x, scale, dy, rng = _inputs(shape, dtype, jnp.float32)
    dskip = jnp.asarray(rng.standard_normal(shape), dtype)

    def fb(x, scale, dy, dskip):
        (y, skip), vjp = jax.vjp(lambda x, s: fn(x, s, eps=eps), x, scale)
        return (y, skip, *vjp((dy, dskip)))

    y, skip, dx, dscale = jax.jit(fb)(x, scale, dy, dskip)
    want_y, want_dx, want_dscale = _np_rms(x, scale, dy, eps)
    assert np.array_equal(np.asarray(skip), np.asarray(x))
    for a, b, like in ((y, want_y, x), (dx, want_dx + np.asarray(dskip, np.float64), x), (dscale, want_dscale, scale)):
        assert a.shape == like.shape and a.dtype == like.dtype
        assert _rel(a, b) < tol, (_rel(a, b), tol)


AVAILABLE = [name for name in registry.names() if registry.available(name)]


@pytest.mark.parametrize("impl", ["auto", *AVAILABLE])
@pytest.mark.parametrize("shape", [(7, 64), (2, 9, 128), (300, 40)])
def test_float32(impl, shape):
    _check(lambda *a, **k: rms_norm(*a, impl=impl, **k), shape, jnp.float32, 1e-5)


@pytest.mark.parametrize("impl", AVAILABLE)
def test_bfloat16(impl):
    _check(lambda *a, **k: rms_norm(*a, impl=impl, **k), (4, 256, 512), jnp.bfloat16, 2e-2)


def test_auto_picks_triton_for_bf16_rows_it_holds_where_jax_triton_runs(monkeypatch):
    from pallas_kernels import _triton
    from pallas_kernels.rms_norm import _auto

    assert _auto(x_shape=(4, 4096, 3072), dtype=jnp.bfloat16) == "fused"  # no GPU here
    monkeypatch.setattr(_triton, "available", lambda: True)
    assert _auto(x_shape=(4, 4096, 3072), dtype=jnp.bfloat16) == "triton"
    assert _auto(x_shape=(4, 4096, 3072), dtype=jnp.float32) == "fused"
    assert _auto(x_shape=(4, 32768), dtype=jnp.bfloat16) == "fused"  # wider than one program's registers


@pytest.mark.parametrize("impl", AVAILABLE)
def test_norm_and_skip(impl):
    _check_skip(lambda *a, **k: rms_norm_and_skip(*a, impl=impl, **k), (3, 5, 48), jnp.float32, 1e-5)


@pytest.mark.parametrize("shape,dtype,tol", [((7, 64), jnp.float32, 1e-5), ((3, 5, 96), jnp.float32, 1e-5),
                                             ((2, 9, 160), jnp.bfloat16, 2e-2)])
def test_triton_interpret(shape, dtype, tol, monkeypatch):
    """The Triton kernels in the interpreter: a row width that is not a power of two (masked lanes), and fewer
    backward programs than rows, so each program sums several rows' weight gradient."""
    from pallas_kernels.rms_norm import triton_kernel

    monkeypatch.setattr(triton_kernel, "BACKWARD_PROGRAMS", 4)
    _check(lambda x, s, eps: triton_kernel.rms_norm(x, s, eps=eps, interpret=True), shape, dtype, tol,
           scale_dtype=jnp.float32)
    _check_skip(lambda x, s, eps: triton_kernel.rms_norm_and_skip(x, s, eps=eps, interpret=True), shape, dtype, tol)


def test_triton_interpret_needs_the_environment_variable():
    """Interpret mode without TRITON_INTERPRET=1 at import time would fail deep inside Triton: say so up front."""
    code = ("import jax.numpy as jnp; from pallas_kernels.rms_norm import triton_kernel; "
            "triton_kernel.rms_norm(jnp.ones((2, 8)), jnp.ones(8), interpret=True)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


@gpu
@pytest.mark.parametrize("impl", registry.names())
def test_gpu_bfloat16(impl):
    _check(lambda *a, **k: rms_norm(*a, impl=impl, **k), (4, 4096, 3072), jnp.bfloat16, 2e-2)
    _check_skip(lambda *a, **k: rms_norm_and_skip(*a, impl=impl, **k), (4, 4096, 3072), jnp.bfloat16, 2e-2)


def test_triton_is_off_where_jax_triton_does_not_import(monkeypatch):
    """A GPU with a jax-triton that fails to import (a Triton it was not built for) keeps the XLA kernels, with a
    warning, instead of failing inside the traced step."""
    import builtins
    import importlib.util

    from pallas_kernels import _triton

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "jax_triton":
            raise ImportError("triton 9.9 is not supported")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_triton, "platform", lambda: "gpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(builtins, "__import__", broken)
    _triton.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="does not import"):
            assert _triton.available() is False
    finally:
        _triton.available.cache_clear()
