"""Attention under a remat policy that saves ``attention_out``: the backward must not rerun the forward kernel.

A custom VJP's own residuals (the output, the log-sum-exp) are recomputed under ``save_only_these_names`` unless
they carry a saved name, which reruns the whole forward kernel in the backward. Traced only (``make_jaxpr``), so
the Mosaic GPU kernel is checked on the CPU without compiling it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.attention import cudnn, mosaic_gpu, reference


def count_in_backward(fn, args, primitive: str, saved=("attention_out",)) -> tuple[int, int]:
    """(count of ``primitive`` outside, inside) the rematerialized backward of ``fn`` under ``saved`` names."""
    policy = jax.checkpoint_policies.save_only_these_names(*saved)
    jaxpr = jax.make_jaxpr(jax.grad(jax.checkpoint(fn, policy=policy), argnums=(0, 1, 2)))(*args).jaxpr

    def walk(jaxpr, inside):
        counts = [0, 0]
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                counts[inside] += 1
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        a, b = walk(sub, inside or eqn.primitive.name == "remat2")
                        counts[0] += a
                        counts[1] += b
        return counts

    return tuple(walk(jaxpr, False))


def _loss(attention_fn, q, k, v):
    out = checkpoint_name(attention_fn(q, k, v), "attention_out")
    return jnp.sum(out.astype(jnp.float32) ** 2)


def test_mosaic_gpu_flash_backward_reuses_the_saved_forward():
    x = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
    fn = functools.partial(_loss, functools.partial(mosaic_gpu.attention, causal=True))
    # Saved: the forward kernel runs once, the backward runs only the dQ and dK/dV kernels.
    assert count_in_backward(fn, (x, x, x), "mpmd_map") == (1, 2)
    # Not saved: the backward reruns the forward kernel first.
    assert count_in_backward(fn, (x, x, x), "mpmd_map", saved=("other",)) == (1, 3)


def test_named_residuals_wrapper_stops_the_forward_recompute():
    q, k, v = (jnp.ones((1, 16, 2, 8)) for _ in range(3))
    plain = functools.partial(_loss, functools.partial(reference.attention, causal=True))
    named = functools.partial(_loss, cudnn.with_named_residuals(functools.partial(reference.attention, causal=True)))
    # The reference attention has two dots forward (scores, P@V) and four backward; unwrapped, the backward also
    # rebuilds the scores to get the probabilities back.
    assert count_in_backward(plain, (q, k, v), "dot_general") == (2, 5)
    assert count_in_backward(named, (q, k, v), "dot_general") == (2, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_named_residuals_wrapper_keeps_the_gradients(causal):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 4, 8)), jnp.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    attn = functools.partial(reference.attention, causal=causal)
    policy = jax.checkpoint_policies.save_only_these_names("attention_out")
    want = jax.grad(functools.partial(_loss, attn), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(jax.checkpoint(functools.partial(_loss, cudnn.with_named_residuals(attn)), policy=policy),
                   argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_named_residuals_wrapper_takes_a_traced_mask_as_an_argument():
    """The cuDNN segment path builds its mask from traced segment ids: passing it as an argument (not a closure)
    keeps the custom VJP free of leaked tracers under jit, and the mask is honoured."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat([1, 2], 8)[None], jnp.int32)

    def loss(q, k, v, seg, wrap):
        mask = reference.attention_mask(16, 16, seg, causal=True)
        fn = cudnn.with_named_residuals(_masked_reference) if wrap else _masked_reference
        return jnp.sum(fn(q, k, v, mask) ** 2)

    want = jax.jit(jax.grad(functools.partial(loss, wrap=False)))(q, k, v, seg)
    got = jax.jit(jax.grad(functools.partial(loss, wrap=True)))(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    wrapped = jax.jit(lambda q, k, v, seg: cudnn.with_named_residuals(_masked_reference)(
        q, k, v, reference.attention_mask(16, 16, seg, causal=True)))
    segmented = jax.jit(lambda q, k, v, seg: reference.attention(q, k, v, segment_ids=seg, causal=True))
    np.testing.assert_allclose(np.asarray(wrapped(q, k, v, seg)), np.asarray(segmented(q, k, v, seg)),
                               rtol=1e-5, atol=1e-6)


def _masked_reference(q, k, v, mask):
    """Dense attention with an explicit boolean mask [B, 1, S, S] (what cuDNN gets), in float32."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    scores = jnp.where(mask, scores, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
