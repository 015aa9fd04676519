"""Attention correctness.

CPU (always): the reference against an independent float64 numpy implementation; the Pallas Mosaic GPU kernel in
GPU interpret mode (``plgpu.InterpretGPUParams``) against the float32 reference, forward and dq/dk/dv.
GPU (``-m gpu``, skipped without a GPU): the compiled kernel, cuDNN and ``auto`` at larger shapes.

Interpret-mode caveat (jax 0.11.2): the interpreter runs wgmma only with both operands in SMEM and does not
interpret ``pl.run_state``; the kernel's register-operand products (P@V, dS@K, P^T@dO, dS^T@Q) therefore run as
``jnp.dot`` in interpret mode (``mosaic_gpu._mma``). Those wgmma forms are covered by the GPU tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention as dispatch_attention
from pallas_kernels.attention import mosaic_gpu, reference

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")


def _ragged_segments(rng, batch, seq, with_padding=True):
    """Packed documents of random lengths per row (ids 1..n), optionally a padding tail of id 0."""
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, doc = 0, 1
        end = seq - (int(rng.integers(1, seq // 4)) if with_padding else 0)
        while pos < end:
            n = int(rng.integers(1, max(2, seq // 3)))
            out[b, pos:min(end, pos + n)] = doc
            pos += n
            doc += 1
    return jnp.asarray(out)


def _shuffled_segments(rng, batch, seq, n_ids=3):
    """Runs of random length with ids drawn from a small set: the same id comes back (non-contiguous segments)."""
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos = 0
        while pos < seq:
            n = int(rng.integers(8, 96))
            out[b, pos:pos + n] = int(rng.integers(0, n_ids))
            pos += n
    return jnp.asarray(out)


def _segments(kind, rng, batch, seq):
    if kind is None:
        return None
    if kind == "shuffled":
        return _shuffled_segments(rng, batch, seq)
    if kind == "short":  # many short documents: most blocks skipped
        out = np.zeros((batch, seq), np.int32)
        for b in range(batch):
            pos, doc = 0, 1
            while pos < seq:
                n = int(rng.integers(16, max(17, seq // 6)))
                out[b, pos:pos + n] = doc
                pos, doc = pos + n, doc + 1
        return jnp.asarray(out)
    if kind == "long":  # documents of a third to a half of the row: the kernels' unmasked blocks inside them
        out = np.ones((batch, seq), np.int32)
        for b in range(batch):
            pos, doc = 0, 1
            while pos < seq:
                n = int(rng.integers(seq // 3, seq // 2 + 32))
                out[b, pos:pos + n] = doc
                pos, doc = pos + n, doc + 1
        return jnp.asarray(out)
    return _ragged_segments(rng, batch, seq)


def _numpy_attention(q, k, v, segment_ids, causal, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    group = h // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = np.ones((b, 1, s, s), bool)
    if causal:
        mask &= np.tril(np.ones((s, s), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        mask &= (seg[:, :, None] == seg[:, None, :])[:, None]
    logits = np.where(mask, logits, -np.inf)
    mx = logits.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.exp(logits - mx)
    denom = p.sum(-1, keepdims=True)
    p = np.where(denom > 0, p / np.where(denom > 0, denom, 1.0), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seed, b, s, h, kvh, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    assert np.isfinite(a).all(), "non-finite values in the result"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fwd_bwd(fn, q, k, v, do, **kw):
    f32 = lambda x: x.astype(jnp.float32)
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, vjp(do.astype(out.dtype))


def _check_against_reference(fn, q, k, v, do, tol, **kw):
    f32 = lambda x: x.astype(jnp.float32)
    out, grads = _fwd_bwd(fn, q, k, v, do, **kw)
    ref_out, ref_grads = _fwd_bwd(reference.attention, f32(q), f32(k), f32(v), f32(do), **kw)
    errs = {"out": _rel(out, ref_out)}
    errs.update({n: _rel(g, rg) for n, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert all(e < tol for e in errs.values()), errs
    return errs


# ---------------------------------------------------------------------------------------------------------------
# CPU: reference vs numpy float64
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("segments", [False, True])
def test_reference_matches_numpy(causal, heads, kv_heads, segments):
    b, s, d = 2, 48, 16
    q, k, v, _ = _inputs(1, b, s, heads, kv_heads, d)
    seg = _ragged_segments(np.random.default_rng(0), b, s) if segments else None
    scale = 0.3
    got = reference.attention(q, k, v, segment_ids=seg, causal=causal, softmax_scale=scale)
    want = _numpy_attention(q, k, v, seg, causal, scale)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_reference_default_scale_and_dtype():
    q, k, v, _ = _inputs(2, 1, 32, 2, 1, 16, jnp.bfloat16)
    got = reference.attention(q, k, v, causal=True)
    assert got.dtype == jnp.bfloat16
    want = _numpy_attention(q, k, v, None, True, 16**-0.5)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_cudnn_segment_offsets():
    from pallas_kernels.attention.cudnn import segment_offsets

    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    offsets, lengths = segment_offsets(seg, 4)
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
    np.testing.assert_array_equal(lengths, [[3, 2, 3, -1], [8, -1, -1, -1]])


# ---------------------------------------------------------------------------------------------------------------
# CPU: the Mosaic GPU kernel in interpret mode
# ---------------------------------------------------------------------------------------------------------------
_SMALL = mosaic_gpu.Config(block_q=64, block_kv=64, max_concurrent_steps=2)

INTERPRET_CASES = [
    # (batch, seq, heads, kv_heads, head_dim, causal, segments)
    pytest.param(1, 256, 4, 2, 64, True, None, id="causal-gqa2-d64"),
    pytest.param(1, 256, 2, 1, 64, False, "ragged", id="full-gqa2-ragged"),
    pytest.param(2, 128, 4, 1, 64, True, "ragged", id="causal-gqa4-ragged-b2"),
    pytest.param(1, 128, 2, 2, 128, True, "ragged", id="causal-mha-d128-ragged"),
    pytest.param(1, 256, 2, 1, 64, True, "short", id="causal-gqa2-short-docs-skipping"),
    pytest.param(1, 256, 2, 1, 64, False, "shuffled", id="full-gqa2-noncontiguous-ids"),
    pytest.param(1, 256, 4, 2, 64, True, "long", id="causal-gqa2-long-docs"),
    pytest.param(1, 256, 2, 1, 64, False, "long", id="full-gqa2-long-docs"),
]


@pytest.mark.skipif(ON_GPU, reason="interpret-mode tests are for CPU")
@pytest.mark.parametrize("b,s,h,kvh,d,causal,segments", INTERPRET_CASES)
def test_pallas_interpret(b, s, h, kvh, d, causal, segments):
    q, k, v, do = _inputs(b * 100 + s + h + d, b, s, h, kvh, d, jnp.bfloat16)
    seg = _segments(segments, np.random.default_rng(s + d), b, s)

    def fn(q, k, v, **kw):
        return mosaic_gpu.attention(q, k, v, config=_SMALL, interpret=True, **kw)

    scale = None if causal else 0.2  # non-causal cases also check a non-default softmax scale
    _check_against_reference(fn, q, k, v, do, tol=1e-2, segment_ids=seg, causal=causal, softmax_scale=scale)


@pytest.mark.skipif(ON_GPU, reason="interpret-mode tests are for CPU")
@pytest.mark.parametrize("b,s,h,kvh,d,causal,segments",
                         [p for p in INTERPRET_CASES if p.id != "full-gqa2-long-docs"])  # its path: the causal case's
def test_pallas_interpret_fused_backward(b, s, h, kvh, d, causal, segments):
    """The one-kernel backward (dS^T handed to a dQ warpgroup, dQ in 64-column chunks) against the float32
    reference: the causal diagonal's skipped half-steps, ragged and non-contiguous documents, GQA groups."""
    q, k, v, do = _inputs(b * 100 + s + h + d, b, s, h, kvh, d, jnp.bfloat16)
    seg = _segments(segments, np.random.default_rng(s + d), b, s)
    fused = dataclasses.replace(_SMALL, backward="fused", fused_dq_cols=64)

    def fn(q, k, v, **kw):
        return mosaic_gpu.attention(q, k, v, config=fused, interpret=True, **kw)

    scale = None if causal else 0.2
    _check_against_reference(fn, q, k, v, do, tol=1e-2, segment_ids=seg, causal=causal, softmax_scale=scale)


@pytest.mark.skipif(ON_GPU, reason="interpret-mode tests are for CPU")
@pytest.mark.parametrize("b,s,h,kvh,d,causal,segments",
                         [p for p in INTERPRET_CASES if p.id in ("causal-gqa2-d64", "causal-mha-d128-ragged")])
def test_pallas_interpret_fused_backward_equals_two_kernels(b, s, h, kvh, d, causal, segments):
    """dK and dV of the one-kernel backward are the two-kernel backward's (the same products in the same order);
    dQ (whole 128-column products here) differs only by the order of its float32 sums and one bf16 rounding."""
    q, k, v, do = _inputs(b * 100 + s + h + d, b, s, h, kvh, d, jnp.bfloat16)
    seg = _segments(segments, np.random.default_rng(s + d), b, s)
    fused = dataclasses.replace(_SMALL, backward="fused", fused_dq_cols=128)
    kw = dict(segment_ids=seg, causal=causal)
    _, got = _fwd_bwd(lambda q, k, v, **kw: mosaic_gpu.attention(q, k, v, config=fused, interpret=True, **kw),
                      q, k, v, do, **kw)
    _, want = _fwd_bwd(lambda q, k, v, **kw: mosaic_gpu.attention(q, k, v, config=_SMALL, interpret=True, **kw),
                       q, k, v, do, **kw)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert _rel(g, w) < (1e-6 if name != "dq" else 8e-3), (name, _rel(g, w))


@pytest.mark.skipif(ON_GPU, reason="interpret-mode tests are for CPU")
def test_pallas_interpret_large_segment_ids():
    """Ids of 2**24 and above (global document ids) stay distinct: the kernels compare ids as float32, where
    2**24 and 2**24 + 1 are the same number, so documents used to see each other (relative error ~0.6)."""
    b, s, h, kvh, d = 1, 128, 2, 1, 64
    q, k, v, do = _inputs(11, b, s, h, kvh, d, jnp.bfloat16)
    seg = jnp.asarray(_ragged_segments(np.random.default_rng(5), b, s, with_padding=False)) + 2**24
    assert len(np.unique(np.asarray(seg, np.float32))) < len(np.unique(np.asarray(seg)))  # some ids collide

    def fn(q, k, v, **kw):
        return mosaic_gpu.attention(q, k, v, config=_SMALL, interpret=True, **kw)

    _check_against_reference(fn, q, k, v, do, tol=1e-2, segment_ids=seg, causal=True)


def test_segment_spans_give_each_document_its_first_position():
    seg = jnp.asarray([[7, 7, 2**30, 2**30, 7, 0], [5, 5, 5, 5, 5, 5]], jnp.int32)
    first, last = mosaic_gpu.segment_spans(seg)
    np.testing.assert_array_equal(first, [[0, 0, 2, 2, 0, 5], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last, [[4, 4, 3, 3, 4, 5], [5, 5, 5, 5, 5, 5]])


@pytest.mark.skipif(ON_GPU, reason="interpret-mode tests are for CPU")
def test_pallas_interpret_lse():
    b, s, h, kvh, d = 1, 128, 2, 1, 64
    q, k, v, _ = _inputs(7, b, s, h, kvh, d, jnp.bfloat16)
    _, lse = mosaic_gpu.attention_with_lse(q, k, v, causal=True, config=_SMALL, interpret=True)
    logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64),
                       np.repeat(np.asarray(k, np.float64), h // kvh, axis=2)) * d**-0.5
    logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
    want = np.log2(np.exp(logits).sum(-1))  # base-2 log-sum-exp, [b, h, q]
    np.testing.assert_allclose(np.asarray(lse), want, rtol=0, atol=2e-2)


def test_segment_block_ranges():
    rng = np.random.default_rng(3)
    for seg in (_shuffled_segments(rng, 2, 256), _segments("short", rng, 2, 256), _ragged_segments(rng, 2, 256)):
        lo, hi = mosaic_gpu.segment_block_ranges(seg, 32, 16)
        s = np.asarray(seg)
        for b in range(2):
            for t in range(256 // 32):
                rows = s[b, t * 32:(t + 1) * 32]
                cols = np.nonzero(np.isin(s[b], rows))[0]
                assert lo[b, t] == cols.min() // 16 and hi[b, t] == cols.max() // 16 + 1


def test_segment_clean_ranges():
    """Each tile's clean blocks are exactly the blocks whose every key shares the tile's one id in the same run
    (so neither mask is needed there); a tile of several ids has none."""
    rng = np.random.default_rng(4)
    cases = (_segments("long", rng, 3, 256), _shuffled_segments(rng, 2, 256), _ragged_segments(rng, 2, 256),
             jnp.ones((1, 256), jnp.int32))
    seen_clean = 0
    for seg in cases:
        for tile, block in ((32, 16), (64, 64), (64, 128)):
            lo, hi = mosaic_gpu.segment_clean_ranges(seg, tile, block)
            s = np.asarray(seg)
            for b in range(s.shape[0]):
                for t in range(s.shape[1] // tile):
                    rows = s[b, t * tile:(t + 1) * tile]
                    r0, r1 = t * tile, (t + 1) * tile - 1
                    want = []
                    for j in range(s.shape[1] // block):
                        c0, c1 = j * block, (j + 1) * block - 1
                        span = s[b, min(r0, c0):max(r1, c1) + 1]  # the tile, the block and what lies between
                        if (rows == rows[0]).all() and (span == rows[0]).all():
                            want.append(j)
                    got = list(range(lo[b, t], hi[b, t]))
                    assert got == want, (b, t, tile, block, got, want)
                    seen_clean += len(got)
    assert seen_clean > 50  # the cases do exercise clean blocks


def test_pallas_supports():
    assert mosaic_gpu.supports((1, 4096, 32, 128), (1, 4096, 8, 128), jnp.bfloat16) is None
    assert mosaic_gpu.supports((1, 4096, 32, 96), (1, 4096, 8, 96), jnp.bfloat16) is not None
    assert mosaic_gpu.supports((1, 4000, 32, 128), (1, 4000, 8, 128), jnp.bfloat16) is not None
    assert mosaic_gpu.supports((1, 4096, 32, 128), (1, 4096, 8, 128), jnp.float32) is not None
    shape = ((1, 4096, 32, 128), (1, 4096, 8, 128), jnp.bfloat16)
    assert "registers" in mosaic_gpu.supports(*shape, mosaic_gpu.Config(compute_registers=240, memory_registers=40))
    assert "registers" in mosaic_gpu.supports(*shape, mosaic_gpu.Config(fused_compute_registers=224,
                                                                         fused_dq_registers=72))
    assert "backward" in mosaic_gpu.supports(*shape, mosaic_gpu.Config(backward="one"))
    assert "fused_dq_cols" in mosaic_gpu.supports(*shape, mosaic_gpu.Config(fused_dq_cols=32))


def test_pallas_default_registers_follow_sequence_length(monkeypatch):
    """Head dim 128 up to S 4096 takes the 240 / 24 register split (faster there under sustained load), longer
    sequences and head dim 64 keep 232 / 40; ATTN_PALLAS_CONFIG still overrides either."""
    monkeypatch.delenv("ATTN_PALLAS_CONFIG", raising=False)
    split = lambda cfg: (cfg.compute_registers, cfg.memory_registers)
    assert split(mosaic_gpu.default_config(128, 4096)) == (240, 24)
    assert split(mosaic_gpu.default_config(128, 1024)) == (240, 24)
    assert split(mosaic_gpu.default_config(128, 8192)) == (232, 40)
    assert split(mosaic_gpu.default_config(128)) == (232, 40)
    assert split(mosaic_gpu.default_config(64, 4096)) == (232, 40)
    assert mosaic_gpu.supports((1, 4096, 32, 128), (1, 4096, 8, 128), jnp.bfloat16) is None
    monkeypatch.setenv("ATTN_PALLAS_CONFIG", '{"compute_registers": 232, "memory_registers": 40}')
    assert split(mosaic_gpu.default_config(128, 4096)) == (232, 40)


def test_pallas_default_config_lowers_for_cuda():
    """The default config at a short sequence (the 240 / 24 split) lowers, forward and backward."""
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    f = lambda q, k, v: jax.vjp(lambda q, k, v: mosaic_gpu.attention(q, k, v, causal=True), q, k, v)[1](q)
    jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("backward", ["two_kernels", "fused"])
def test_pallas_lowers_for_cuda(causal, segments, head_dim, backward):
    """The real Mosaic GPU lowering (not interpret mode), forward and backward, run on the CPU for the CUDA platform:
    catches lowering-only failures (seen once: a concrete array closed over by ``pl.run_state``)."""
    config = dataclasses.replace(mosaic_gpu.default_config(head_dim), backward=backward)
    q = jax.ShapeDtypeStruct((1, 512, 4, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, head_dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 512), jnp.int32)

    def f(q, k, v, seg):
        fn = lambda q, k, v: mosaic_gpu.attention(q, k, v, segment_ids=seg if segments else None, causal=causal,
                                                  config=config)
        return jax.vjp(fn, q, k, v)[1](q)

    jax.jit(f).trace(q, k, k, seg).lower(lowering_platforms=("cuda",))


def test_auto_is_reference_on_cpu():
    if ON_GPU:
        pytest.skip("CPU dispatch")
    from pallas_kernels.attention import registry

    name, _ = registry.resolve("auto", q_shape=(1, 256, 4, 64), kv_shape=(1, 256, 2, 64), dtype=jnp.bfloat16)
    assert name == "reference"


def test_forcing_an_implementation_this_machine_lacks_says_what_it_needs():
    if ON_GPU:
        pytest.skip("CPU dispatch")
    from pallas_kernels.attention import registry
    from pallas_kernels.mlp import registry as mlp_registry

    with pytest.raises(ValueError, match=r"attention: impl 'pallas' is not available on platform 'cpu' \(it needs an "
                                         r"NVIDIA Hopper GPU \(compute capability 9.x\)\); impl='auto' picks"):
        registry.resolve("pallas", q_shape=(1, 256, 4, 64), kv_shape=(1, 256, 2, 64), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"mlp: impl 'mosaic_gpu_triton_bwd' .*Hopper GPU .* and jax-triton"):
        mlp_registry.resolve("mosaic_gpu_triton_bwd", x_shape=(8, 16), w_shape=(16, 2, 32), dtype=jnp.bfloat16)


@pytest.mark.parametrize("hopper", [False, True])
def test_auto_on_a_gpu_sends_what_cudnn_cannot_take_to_the_reference(monkeypatch, hopper):
    """The rule as a GPU would run it (platform and card faked): float32 inputs or a head dim cuDNN rejects go to
    XLA's attention, not to a cuDNN call that raises (a float32 model on a GPU did)."""
    import importlib

    import pallas_kernels._dispatch

    attention_mod = importlib.import_module("pallas_kernels.attention")  # the package (its name is also a function)

    for module in (attention_mod, pallas_kernels._dispatch):
        monkeypatch.setattr(module, "platform", lambda: "gpu")
    monkeypatch.setattr(attention_mod, "is_hopper", lambda: hopper)
    monkeypatch.setattr(pallas_kernels._dispatch, "is_hopper", lambda: hopper)
    pick = lambda d, dtype, seq=4096: attention_mod._auto(  # noqa: E731
        q_shape=(2, seq, 8, d), kv_shape=(2, seq, 2, d), dtype=dtype, causal=True)
    assert pick(128, jnp.bfloat16) == ("pallas" if hopper else "cudnn")
    assert pick(128, jnp.float16, seq=4000) == "cudnn"  # Pallas needs seq % 128 == 0; cuDNN does not
    assert pick(128, jnp.float32) == "reference"
    assert pick(96, jnp.bfloat16) == "cudnn"
    assert pick(100, jnp.bfloat16) == "reference"
    assert pick(256, jnp.bfloat16) == ("cudnn" if hopper else "reference")
    # cuDNN's backward refuses odd lengths (jax always passes it a bias): a training step there raised
    assert pick(128, jnp.bfloat16, seq=1023) == "reference"
    assert pick(128, jnp.bfloat16, seq=1000) == "cudnn"
    # cuDNN's causal diagonal is top-left, the reference's bottom-right: seq_q != seq_k gave other numbers
    cross = lambda causal: attention_mod._auto(  # noqa: E731
        q_shape=(2, 64, 8, 128), kv_shape=(2, 256, 2, 128), dtype=jnp.bfloat16, causal=causal)
    assert cross(True) == "reference" and cross(False) == "cudnn"
    from pallas_kernels.attention import cudnn

    q = jnp.zeros((1, 128, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="impl 'cudnn': dtype must be bfloat16 or float16, not float32"):
        cudnn.attention(q, q, q)
    q = jnp.zeros((1, 127, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"impl 'cudnn': sequence lengths must be even .* q 127 / kv 127"):
        cudnn.attention(q, q, q)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
GPU_CASES = [
    pytest.param(2, 1024, 8, 2, 128, True, None, id="causal-gqa4-d128"),
    pytest.param(2, 1024, 8, 2, 128, False, None, id="full-gqa4-d128"),
    pytest.param(2, 1024, 8, 8, 64, True, None, id="causal-mha-d64"),
    pytest.param(2, 2048, 12, 4, 128, True, "ragged", id="causal-gqa3-d128-ragged"),
    pytest.param(1, 1024, 4, 1, 64, False, "ragged", id="full-gqa4-d64-ragged"),
    pytest.param(2, 2048, 8, 2, 128, True, "short", id="causal-gqa4-d128-short-docs"),
    pytest.param(1, 2048, 8, 2, 128, True, "shuffled", id="causal-gqa4-d128-noncontiguous"),
    pytest.param(2, 2048, 8, 2, 64, True, "ragged", id="causal-gqa4-d64-ragged"),  # the 1B model on packed data
    pytest.param(2, 2048, 8, 2, 128, True, "long", id="causal-gqa4-d128-long-docs"),  # mostly unmasked blocks
]


@gpu
@needs_gpu
@pytest.mark.parametrize("b,s,h,kvh,d,causal,segments", GPU_CASES)
@pytest.mark.parametrize("impl", ["pallas", "pallas-fused-backward", "cudnn"])
def test_gpu_against_reference(impl, b, s, h, kvh, d, causal, segments):
    from pallas_kernels._dispatch import is_hopper

    if impl.startswith("pallas") and not is_hopper():
        pytest.skip("Pallas Mosaic GPU kernel needs Hopper")
    q, k, v, do = _inputs(s + h + d, b, s, h, kvh, d, jnp.bfloat16)
    seg = _segments(segments, np.random.default_rng(s + d), b, s)
    if impl == "pallas-fused-backward":
        config = dataclasses.replace(mosaic_gpu.default_config(d), backward="fused")
        fn = lambda q, k, v, **kw: mosaic_gpu.attention(q, k, v, config=config, **kw)
    else:
        fn = lambda q, k, v, **kw: dispatch_attention(q, k, v, impl=impl, **kw)
    errs = _check_against_reference(jax.jit(fn, static_argnames=("causal",)), q, k, v, do, tol=1e-2,
                                    segment_ids=seg, causal=causal)
    print(impl, errs)


@gpu
@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_pallas_is_as_accurate_as_cudnn_on_packed_documents(d):
    """On the same bf16 inputs (causal, GQA, packed documents), the Pallas kernel's error against the float32
    reference is within 1.25x of cuDNN's for the output and every gradient: different rounding, not a bias."""
    from pallas_kernels._dispatch import is_hopper

    if not is_hopper():
        pytest.skip("Pallas Mosaic GPU kernel needs Hopper")
    q, k, v, do = _inputs(11 + d, 2, 2048, 8, 2, d, jnp.bfloat16)
    seg = _segments("ragged", np.random.default_rng(d), 2, 2048)
    errs = {}
    for impl in ("pallas", "cudnn"):
        fn = jax.jit(lambda q, k, v, impl=impl, **kw: dispatch_attention(q, k, v, impl=impl, **kw),
                     static_argnames=("causal",))
        errs[impl] = _check_against_reference(fn, q, k, v, do, tol=1e-2, segment_ids=seg, causal=True)
    print(errs)
    for name in ("out", "dq", "dk", "dv"):
        assert errs["pallas"][name] <= 1.25 * errs["cudnn"][name], errs


@gpu
@needs_gpu
def test_gpu_auto_dispatch():
    from pallas_kernels.attention import registry

    from pallas_kernels._dispatch import is_hopper

    name, _ = registry.resolve("auto", q_shape=(4, 4096, 32, 128), kv_shape=(4, 4096, 8, 128), dtype=jnp.bfloat16,
                               causal=True)
    assert name == ("pallas" if is_hopper() else "cudnn")
    name, _ = registry.resolve("auto", q_shape=(2, 8192, 32, 128), kv_shape=(2, 8192, 8, 128), dtype=jnp.bfloat16,
                               causal=True)
    assert name == ("pallas" if is_hopper() else "cudnn")
    name, _ = registry.resolve("auto", q_shape=(2, 4096, 32, 128), kv_shape=(2, 4096, 8, 128), dtype=jnp.bfloat16,
                               causal=False)
    assert name == "cudnn"
    name, _ = registry.resolve("auto", q_shape=(2, 4096, 32, 128), kv_shape=(2, 4096, 8, 128), dtype=jnp.float32,
                               causal=True)
    assert name == "reference"  # cuDNN takes 16-bit inputs only
    q, k, v, do = _inputs(5, 1, 1024, 8, 2, 128, jnp.bfloat16)
    _check_against_reference(jax.jit(lambda q, k, v, **kw: dispatch_attention(q, k, v, **kw),
                                     static_argnames=("causal",)), q, k, v, do, tol=1e-2, causal=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("seq_q,seq_k,causal", [(1023, 1023, True), (1000, 1000, True), (64, 256, True),
                                                (64, 256, False)])
def test_gpu_auto_trains_on_what_neither_kernel_nor_cudnn_take(seq_q, seq_k, causal):
    """Odd lengths (cuDNN's backward refuses them) and causal seq_q != seq_k (cuDNN's diagonal is top-left, the
    reference's bottom-right): ``auto`` gives the reference's numbers, forward and gradients, where the first
    raised inside jax and the second was off by a relative error of ~1.8."""
    q, _, _, do = _inputs(seq_q, 2, seq_q, 8, 2, 128, jnp.bfloat16)
    _, k, v, _ = _inputs(seq_k + 1, 2, seq_k, 8, 2, 128, jnp.bfloat16)
    _check_against_reference(jax.jit(lambda q, k, v, **kw: dispatch_attention(q, k, v, **kw),
                                     static_argnames=("causal",)), q, k, v, do, tol=1e-2, causal=causal)
