"""Fused linear cross-entropy in pure JAX: vocabulary projection + log-softmax + NLL, chunked over the vocabulary.

Same contract as ``reference.cross_entropy``: ``x`` [..., d], ``w`` [d, V], ``targets`` [...] int -> per-token float32
loss ``lse - logit[target] + z_loss_weight * lse**2``. The (tokens x vocab) logits are never materialized: the
forward walks the vocabulary in chunks of ``vocab_chunk`` columns with an online logsumexp and keeps only the
per-token ``lse`` (float32, [N]) as residual; the backward recomputes each chunk's logits, forms
``dlogits = g * (softmax * (1 + 2 z lse) - onehot(target))`` in float32, casts it to the input dtype and feeds the two
gradient matmuls (``dx += dlogits @ w_c.T`` accumulated in float32, ``dw[:, c] = x.T @ dlogits`` written in place).
The incoming per-token cotangent ``g`` is how the caller's loss mask arrives (masked tokens have ``g == 0``).

Peak extra memory is about ``N * vocab_chunk * (4 + 4 + 2)`` bytes plus a float32 [N, d] accumulator, instead of
several float32 [N, V] buffers. The price is one extra vocabulary matmul (the backward recomputes the logits):
4 matmuls of 2*N*d*V FLOPs in all instead of 3. A loss that is a weighted sum (training) avoids it with
``single_pass.py``, which forms the gradients in the forward over token chunks.

The vocabulary need not divide into chunks: the last chunk is clamped to end at V and overlaps its neighbour; the
overlapping columns are masked out of the logsumexp and of ``dx``, and the backward walks the chunks from last to
first so that the neighbour rewrites the overlap of ``dw`` with its correct values.

Targets outside [0, V) contribute a target logit of 0 (the caller is expected to mask such tokens).

Tensor parallelism: with ``w``'s vocabulary axis sharded (tensor > 1), GSPMD all-gathers ``w`` for the chunk loop
(seen on a CPU 2x2 data x tensor mesh: results equal the reference's, but each tensor rank then does the whole
vocabulary's work). A shard_map version (local chunks per vocabulary shard, lse combined with pmax/psum) is the fix;
until then prefer ``impl="reference"`` when the vocabulary is tensor-sharded.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Aim for roughly this many bytes per float32 logits chunk ([N, vocab_chunk] float32). Measured on an H100 at
# 16k tokens x V=128256 (docs/perf/kernels.md): 512 MiB chunks (8016 columns) ran forward+backward 6% faster than
# 256 MiB ones (4008) and kept the planned scratch at 7.7% of the reference's (4.5% with 4008).
_CHUNK_BYTES = 512 * 1024 * 1024


def default_vocab_chunk(n_tokens: int, vocab: int) -> int:
    """Chunk width: at most V/16 columns (so a chunk's logits are <= 1/16 of the full logits at any token count) and
    at most 512 MiB of float32 logits, at least 512 columns; a width that splits V evenly (a multiple of 8) is
    preferred when one lies within 25% of that."""
    chunk = min(-(-vocab // 16), _CHUNK_BYTES // max(1, 4 * n_tokens))
    chunk = max(512, chunk)
    if chunk >= vocab:
        return vocab
    n_chunks = math.ceil(vocab / chunk)
    for n in range(n_chunks, n_chunks + max(1, n_chunks // 4) + 1):
        if vocab % n == 0 and (vocab // n) % 8 == 0:
            return vocab // n
    return max(128, (chunk // 128) * 128)


def _chunk_start(i, chunk, vocab):
    return jnp.minimum(i * chunk, vocab - chunk)


def _chunk_logits(x2, w, i, chunk, vocab):
    start = _chunk_start(i, chunk, vocab)
    w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
    logits = jnp.dot(x2, w_c, preferred_element_type=jnp.float32)  # [N, chunk] f32
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    fresh = cols >= i * chunk  # False only on the overlap of the clamped last chunk
    return w_c, logits, cols, fresh, start


def _forward(x2, w, t, chunk):
    n = x2.shape[0]
    vocab = w.shape[1]
    n_chunks = -(-vocab // chunk)

    def body(i, carry):
        m, s, tl = carry
        _, logits, cols, fresh, _ = _chunk_logits(x2, w, i, chunk, vocab)
        tl = tl + jnp.sum(jnp.where((cols == t[:, None]) & fresh, logits, 0.0), axis=1)
        logits = jnp.where(fresh, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        return m_new, s, tl

    init = (
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
    )
    m, s, tl = jax.lax.fori_loop(0, n_chunks, body, init)
    lse = m + jnp.log(s)
    return lse, tl


def _backward(x2, w, t, lse, g, z_loss_weight, chunk):
    n, d = x2.shape
    vocab = w.shape[1]
    n_chunks = -(-vocab // chunk)
    g_soft = g * (1.0 + 2.0 * z_loss_weight * lse)  # d loss / d lse, times the incoming cotangent

    def body(k, carry):
        dx, dw = carry
        i = n_chunks - 1 - k  # last chunk first, so its overlap in dw is rewritten by its neighbour
        w_c, logits, cols, fresh, start = _chunk_logits(x2, w, i, chunk, vocab)
        p = jnp.exp(logits - lse[:, None])
        dlogits = g_soft[:, None] * p - jnp.where(cols == t[:, None], g[:, None], 0.0)
        dlogits = jnp.where(fresh, dlogits, 0.0).astype(x2.dtype)
        dx = dx + jnp.dot(dlogits, w_c.T, preferred_element_type=jnp.float32)
        dw_c = jnp.dot(x2.T, dlogits, preferred_element_type=jnp.float32).astype(w.dtype)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
        return dx, dw

    init = (jnp.zeros((n, d), jnp.float32), jnp.zeros(w.shape, w.dtype))
    dx, dw = jax.lax.fori_loop(0, n_chunks, body, init)
    return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ce(x2, w, t, z_loss_weight, chunk):
    lse, tl = _forward(x2, w, t, chunk)
    return lse - tl + z_loss_weight * jnp.square(lse)


def _ce_fwd(x2, w, t, z_loss_weight, chunk):
    lse, tl = _forward(x2, w, t, chunk)
    return lse - tl + z_loss_weight * jnp.square(lse), (x2, w, t, lse)


def _ce_bwd(z_loss_weight, chunk, res, g):
    x2, w, t, lse = res
    dx, dw = _backward(x2, w, t, lse, g.astype(jnp.float32), z_loss_weight, chunk)
    return dx.astype(x2.dtype), dw, None


_ce.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy(x, w, targets, *, z_loss_weight: float = 0.0, vocab_chunk: int | None = None):
    """Per-token loss [...] float32; see the module docstring."""
    lead = x.shape[:-1]
    d = x.shape[-1]
    vocab = w.shape[1]
    x2 = x.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    chunk = vocab_chunk or default_vocab_chunk(x2.shape[0], vocab)
    chunk = min(int(chunk), vocab)
    loss = _ce(x2, w, t, float(z_loss_weight), chunk)
    return loss.reshape(lead)
