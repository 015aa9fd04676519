"""Linear cross-entropy: every registered impl against an independent float64 numpy computation.

Forward loss and the gradients of ``sum(g * loss)`` with respect to ``x`` and ``w``, where ``g`` is a per-token
cotangent with masked (zero) tokens, with and without z-loss, on fresh random inputs of several shapes, including
vocabularies that do not divide into chunks. GPU-only tests run the bf16 shapes of a real model.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_entropy import (chunked, cross_entropy, cross_entropy_sum, registry, single_pass,
                                          sum_registry)

gpu = pytest.mark.gpu  # tests/conftest.py skips these without a GPU (LITESPARK_TEST_GPU=1 runs them)
_seed = iter(range(10_000))


def _np_ce(x, w, t, g, z):
    """float64 loss [N] and the gradients of sum(g * loss) wrt x [N, d] and w [d, V]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    logits = x @ w
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    loss = lse - logits[np.arange(len(t)), t] + z * lse**2
    p = np.exp(logits - lse[:, None])
    dlog = (g * (1 + 2 * z * lse))[:, None] * p
    dlog[np.arange(len(t)), t] -= g
    return loss, dlog @ w.T, x.T @ dlog


def _inputs(lead, d, v, dtype):
    rng = np.random.default_rng(next(_seed))
    x = rng.standard_normal((*lead, d))
    w = rng.standard_normal((d, v)) / np.sqrt(d) * 2.0
    t = rng.integers(0, v, lead)
    g = rng.standard_normal(lead) * (rng.random(lead) > 0.3)  # ~30% masked tokens
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(t, jnp.int32), jnp.asarray(g, jnp.float32)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _reference(x, w, t, g, z):
    """``_np_ce`` of the inputs, flattened to tokens: (loss [N], dx [N, d], dw [d, V]) and the cotangent [N]."""
    d = x.shape[-1]
    g64 = np.asarray(g, np.float64).reshape(-1)
    ref = _np_ce(np.asarray(x, np.float64).reshape(-1, d), np.asarray(w, np.float64), np.asarray(t).reshape(-1),
                 g64, z)
    return (*ref, g64)


def _assert_matches(pairs, tol):
    for got, want in pairs:
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        assert _rel(got, want) < tol, (_rel(got, want), tol)


def _assert_masked_tokens_get_zero_dx(dx, g):
    d = dx.shape[-1]
    masked = np.asarray(g).reshape(-1) == 0
    assert np.all(np.asarray(dx, np.float32).reshape(-1, d)[masked] == 0)


def _check_sum(fn, lead, d, v, z, dtype, tol):
    """``fn(x, w, t, g) = sum(g * loss)`` and its gradients in x, w and g against the float64 computation."""
    x, w, t, g = _inputs(lead, d, v, dtype)
    total, (dx, dw, dg) = jax.jit(jax.value_and_grad(lambda x, w, g: fn(x, w, t, g, z_loss_weight=z), (0, 1, 2)))(
        x, w, g)
    n = int(np.prod(lead))
    ref_loss, ref_dx, ref_dw, g64 = _reference(x, w, t, g, z)
    assert total.shape == () and total.dtype == jnp.float32
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.shape == w.shape and dw.dtype == w.dtype
    assert dg.shape == g.shape
    ref_total = np.sum(g64 * ref_loss)
    assert abs(float(total) - ref_total) <= tol * np.sum(np.abs(g64 * ref_loss))
    _assert_matches(((dx.reshape(n, d), ref_dx), (dw, ref_dw), (dg.reshape(n), ref_loss)), tol)
    _assert_masked_tokens_get_zero_dx(dx, g)


def _check(fn, lead, d, v, z, dtype, tol):
    x, w, t, g = _inputs(lead, d, v, dtype)

    def total(x, w):
        return jnp.sum(g * fn(x, w, t, z_loss_weight=z))

    loss = jax.jit(lambda x, w: fn(x, w, t, z_loss_weight=z))(x, w)
    dx, dw = jax.jit(jax.grad(total, (0, 1)))(x, w)
    n = int(np.prod(lead))
    ref_loss, ref_dx, ref_dw, _ = _reference(x, w, t, g, z)
    assert loss.shape == lead and loss.dtype == jnp.float32
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.shape == w.shape and dw.dtype == w.dtype
    _assert_matches(((loss.reshape(n), ref_loss), (dx.reshape(n, d), ref_dx), (dw, ref_dw)), tol)
    _assert_masked_tokens_get_zero_dx(dx, g)  # exactly zero gradient


IMPLS = ["auto", *registry.names()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,d,v", [((37,), 16, 250), ((2, 24), 32, 1000)])
@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_float32(impl, lead, d, v, z):
    _check(lambda *a, **k: cross_entropy(*a, impl=impl, **k), lead, d, v, z, jnp.float32, 1e-5)


@pytest.mark.parametrize("chunk", [64, 100, 333, 1000, 4096])
def test_chunked_chunk_widths(chunk):
    """Chunk widths that divide V, that don't (clamped, overlapping last chunk), equal to and wider than V."""
    _check(lambda *a, **k: chunked.cross_entropy(*a, vocab_chunk=chunk, **k), (48,), 24, 1000, 1e-3, jnp.float32,
           1e-5)


@pytest.mark.parametrize("impl", registry.names())
def test_bfloat16(impl):
    _check(lambda *a, **k: cross_entropy(*a, impl=impl, **k), (4, 32), 64, 3000, 1e-4, jnp.bfloat16, 2e-2)


SUM_IMPLS = ["auto", *sum_registry.names()]


@pytest.mark.parametrize("impl", SUM_IMPLS)
@pytest.mark.parametrize("lead,d,v", [((37,), 16, 250), ((2, 24), 32, 1000)])
@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_sum_float32(impl, lead, d, v, z):
    _check_sum(lambda *a, **k: cross_entropy_sum(*a, impl=impl, **k), lead, d, v, z, jnp.float32, 1e-5)


@pytest.mark.parametrize("rows", [8, 16, 24, 48, 100])
def test_single_pass_row_chunks(rows):
    """Chunks that divide the 48 tokens, that don't (padded with weight-0 rows), equal to and more than them."""
    _check_sum(lambda *a, **k: single_pass.cross_entropy_sum(*a, row_chunk=rows, **k), (48,), 24, 1000, 1e-3,
               jnp.float32, 1e-5)


@pytest.mark.parametrize("impl", sum_registry.names())
def test_sum_bfloat16(impl):
    _check_sum(lambda *a, **k: cross_entropy_sum(*a, impl=impl, **k), (4, 32), 64, 3000, 1e-4, jnp.bfloat16, 2e-2)


def test_single_pass_without_gradients_is_the_chunked_forward():
    """Evaluation (no differentiation) runs one projection: the chunked forward, no gradient matmuls."""
    x, w, t, g = _inputs((64,), 16, 500, jnp.float32)
    f = lambda x, w: single_pass.cross_entropy_sum(x, w, t, g, row_chunk=16)  # noqa: E731
    want = float(jnp.sum(g * chunked.cross_entropy(x, w, t)))
    assert float(jax.jit(f)(x, w)) == pytest.approx(want, rel=1e-6)
    dots = lambda jx: sum(e.primitive.name == "dot_general" for e in jx.eqns) + sum(  # noqa: E731
        dots(sub) for e in jx.eqns for sub in jax.extend.core.jaxprs_in_params(e.params))
    assert dots(jax.make_jaxpr(f)(x, w).jaxpr) == 1
    assert dots(jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr) == 3


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 1000), (5, 4099)])
def test_one_pass_logsumexp_matches_float64(shape):
    """The single-pass loss's one-reduction log-sum-exp against numpy in float64, with rows whose spread (and so
    the rescaling of the running sum) reaches +-1e4, rows of one repeated value and of float32's lowest value."""
    rng = np.random.default_rng(sum(shape))
    logits = rng.normal(size=shape) * np.logspace(-1, 4, shape[0])[:, None]
    logits[-1] = -3.0  # one repeated value: lse = value + log(V)
    if shape[0] > 2:
        logits[0] = np.finfo(np.float32).min  # the initial running max itself
    logits = logits.astype(np.float32)
    got = np.asarray(jax.jit(single_pass.logsumexp_rows)(jnp.asarray(logits)), np.float64)
    x = logits.astype(np.float64)
    top = x.max(axis=1)
    want = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_single_pass_default_row_chunk():
    assert single_pass.default_row_chunk(24576, 128256) == 2048  # 1 GiB of float32 logits, 12 even chunks
    assert single_pass.default_row_chunk(100, 128256) == 100
    assert single_pass.default_row_chunk(16384 + 8, 128256) % 8 == 0


def test_per_token_single_pass_is_chunked():
    x, w, t, _ = _inputs((32,), 16, 300, jnp.float32)
    np.testing.assert_array_equal(cross_entropy(x, w, t, impl="single_pass"), cross_entropy(x, w, t, impl="chunked"))


def test_chunked_never_materializes_logits():
    n, d, v = 256, 16, 4000
    x, w, t, g = _inputs((n,), d, v, jnp.float32)
    f = lambda x, w: jnp.sum(g * chunked.cross_entropy(x, w, t, vocab_chunk=500))
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, (0, 1)))(x, w)

    def sizes(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) < n * v // 4


@pytest.mark.parametrize("impl", ["reference", "chunked", "single_pass"])
def test_out_of_range_targets_under_a_zero_mask_weight_count_for_nothing(impl):
    """An ignore index (-100, or the vocabulary size) under a zero weight: every implementation gives the sum of the
    other tokens' losses. The reference gave NaN (or wrapped -1 to the last word), so the answer changed with the
    problem size ``auto`` saw."""
    x, w, _, _ = _inputs((6,), 16, 40, jnp.float32)
    t = jnp.asarray([3, -100, 7, 40, -1, 39], jnp.int32)
    mask = jnp.asarray([1, 0, 1, 0, 0, 1], jnp.float32)
    valid = np.asarray(mask, bool)
    want = _np_ce(x[valid], w, np.asarray(t)[valid], np.ones(3), 0.0)[0].sum()
    got, dx = jax.value_and_grad(lambda x: cross_entropy_sum(x, w, t, mask, impl=impl))(x)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert np.isfinite(np.asarray(dx)).all() and not np.asarray(dx)[~valid].any()


def test_auto_choice():
    assert registry.resolve("auto", x_shape=(4, 4096, 3072), w_shape=(3072, 128256))[0] == "chunked"
    assert registry.resolve("auto", x_shape=(8, 16), w_shape=(16, 100))[0] == "reference"
    assert chunked.default_vocab_chunk(16384, 128256) == 8016
    assert sum_registry.resolve("auto", x_shape=(4, 4096, 3072), w_shape=(3072, 128256))[0] == "single_pass"
    assert sum_registry.resolve("auto", x_shape=(8, 16), w_shape=(16, 100))[0] == "reference"


@gpu
@pytest.mark.parametrize("impl", registry.names())
@pytest.mark.parametrize("z", [0.0, 1e-4])
def test_gpu_bfloat16(impl, z):
    _check(lambda *a, **k: cross_entropy(*a, impl=impl, **k), (2, 2048), 512, 32000, z, jnp.bfloat16, 2e-2)


@gpu
@pytest.mark.parametrize("impl", sum_registry.names())
def test_gpu_sum_bfloat16(impl):
    _check_sum(lambda *a, **k: cross_entropy_sum(*a, impl=impl, **k), (2, 2048), 512, 32000, 1e-4, jnp.bfloat16,
               2e-2)


@gpu
def test_gpu_llama_vocab_single_pass():
    _check_sum(lambda *a, **k: single_pass.cross_entropy_sum(*a, row_chunk=512, **k), (1536,), 256, 128256, 1e-4,
               jnp.bfloat16, 2e-2)


@gpu
def test_gpu_llama_vocab_chunked():
    _check(chunked.cross_entropy, (1024,), 256, 128256, 1e-4, jnp.bfloat16, 2e-2)
