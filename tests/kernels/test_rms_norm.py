"""RMSNorm: every registered impl against an independent float64 numpy forward and backward (x and scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import registry, rms_norm

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


def _check(fn, shape, dtype, tol, eps=1e-5):
    rng = np.random.default_rng(next(_seed))
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 0.5, dtype)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(shape[-1]), dtype)
    keep = rng.random((*shape[:-1], 1)) > 0.25
    dy = jnp.asarray(rng.standard_normal(shape) * keep, dtype)

    def fb(x, scale, dy):
        y, vjp = jax.vjp(lambda x, s: fn(x, s, eps=eps), x, scale)
        return (y, *vjp(dy))

    got = jax.jit(fb)(x, scale, dy)
    want = _np_rms(x, scale, dy, eps)
    for a, b, like in zip(got, want, (x, x, scale)):
        assert a.shape == b.shape == like.shape and a.dtype == like.dtype
        err = _rel(a, b)
        assert err < tol, (err, tol)


@pytest.mark.parametrize("impl", ["auto", *registry.names()])
@pytest.mark.parametrize("shape", [(7, 64), (2, 9, 128), (300, 40)])
def test_float32(impl, shape):
    _check(lambda *a, **k: rms_norm(*a, impl=impl, **k), shape, jnp.float32, 1e-5)


@pytest.mark.parametrize("impl", registry.names())
def test_bfloat16(impl):
    _check(lambda *a, **k: rms_norm(*a, impl=impl, **k), (4, 256, 512), jnp.bfloat16, 2e-2)


@gpu
@pytest.mark.parametrize("impl", registry.names())
def test_gpu_bfloat16(impl):
    _check(lambda *a, **k: rms_norm(*a, impl=impl, **k), (4, 4096, 3072), jnp.bfloat16, 2e-2)
