"""Weighted linear cross-entropy whose gradients are formed in the forward pass: three vocabulary matmuls, not four.

``cross_entropy_sum(x, w, targets, weights)`` returns the float32 scalar ``sum(weights * loss)`` with the per-token
``loss = lse - logit[target] + z_loss_weight * lse**2`` of ``reference.cross_entropy``. The training loss is such a
sum (the loss mask, or the mask over the token count, as ``weights``), and its cotangent is one scalar: so the
gradients can be computed before the backward pass asks for them and merely scaled then.

The forward walks the tokens in chunks of ``row_chunk`` rows. Each chunk's logits over the whole vocabulary
([rows, V] float32) give its ``lse`` directly, then ``dlogits = weights * (softmax * (1 + 2 z lse) - onehot(target))``,
cast to the input dtype, feeds ``dx[rows] = dlogits @ w.T`` and ``dw += x[rows].T @ dlogits`` (float32). That is one
projection (forward) and two gradient matmuls, against the vocabulary-chunked ``chunked`` kernel's four, which must
recompute its logits once the full ``lse`` is known. The price is memory: a float32 [d, V] accumulator for ``dw`` and
a [rows, V] chunk instead of [N, chunk]; ``row_chunk`` trades the chunk size against the number of passes over that
accumulator (one read and write of it per chunk).

Without differentiation (evaluation) it is ``chunked``'s forward: one projection, nothing else.

Targets outside [0, V) contribute a target logit of 0 and no one-hot term (the caller is expected to mask them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.cross_entropy import chunked

# Aim for about this many bytes per float32 logits chunk ([rows, V] float32).
_CHUNK_BYTES = 1024 * 1024 * 1024


def default_row_chunk(n_tokens: int, vocab: int) -> int:
    """Rows per chunk: about ``_CHUNK_BYTES`` of float32 logits, a multiple of 8, at least 8 and at most the tokens;
    a count that splits the tokens evenly is preferred when one lies within a factor of two of that."""
    budget = _CHUNK_BYTES // (4 * vocab)
    if budget >= n_tokens:
        return n_tokens
    rows = max(8, budget // 8 * 8)
    first = math.ceil(n_tokens / rows)
    for n in range(first, 2 * first + 1):
        if n_tokens % n == 0 and (n_tokens // n) % 8 == 0:
            return n_tokens // n
    return rows


def _online_max_and_sum(a, b):
    """Combine two (running max, sum of exp(x - max)) pairs: the combiner of a one-pass log-sum-exp."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    return m, s1 * jnp.exp(m1 - m) + s2 * jnp.exp(m2 - m)


def logsumexp_rows(logits):
    """``logsumexp(logits, axis=1)`` of finite float32 logits in one reduction over them (a variadic reduce of
    (max, rescaled sum) pairs), where ``jax.nn.logsumexp`` reads them twice (the max, then the sum of exponentials:
    two passes over each 1 GiB chunk, 8.2 ms per 3B step on an H100; this one: 5.8 ms). The initial max is float32's
    lowest finite value rather than -inf, so combining two initial pairs gives 0 * exp(0), not 0 * exp(nan)."""
    lowest = jnp.finfo(jnp.float32).min
    m, s = jax.lax.reduce((logits, jnp.ones_like(logits)), (jnp.float32(lowest), jnp.float32(0.0)),
                          _online_max_and_sum, (1,))
    return m + jnp.log(s)


def _chunk(x_c, w, t_c, m_c, z_loss_weight):
    """One chunk: (sum of weighted losses, per-token losses, dx rows, dw contribution float32)."""
    logits = jnp.dot(x_c, w, preferred_element_type=jnp.float32)  # [rows, V]
    vocab = w.shape[1]
    lse = logsumexp_rows(logits)
    valid = (t_c >= 0) & (t_c < vocab)
    target_logit = jnp.take_along_axis(logits, jnp.clip(t_c, 0, vocab - 1)[:, None], axis=1)[:, 0]
    loss = lse - jnp.where(valid, target_logit, 0.0) + z_loss_weight * jnp.square(lse)
    g_soft = m_c * (1.0 + 2.0 * z_loss_weight * lse)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_c[:, None]
    dlogits = g_soft[:, None] * jnp.exp(logits - lse[:, None]) - jnp.where(onehot, m_c[:, None], 0.0)
    dlogits = dlogits.astype(x_c.dtype)
    dx_c = jnp.dot(dlogits, w.T, preferred_element_type=jnp.float32).astype(x_c.dtype)
    dw_c = jnp.dot(x_c.T, dlogits, preferred_element_type=jnp.float32)
    return jnp.sum(m_c * loss), loss, dx_c, dw_c


def _padded(a, n_pad):
    return a if n_pad == 0 else jnp.pad(a, [(0, n_pad)] + [(0, 0)] * (a.ndim - 1))


def _loss_and_grads(x2, w, t, m, z_loss_weight, rows):
    n, d = x2.shape
    n_chunks = -(-n // rows)
    n_pad = n_chunks * rows - n  # padded rows have weight 0: no loss, no gradient
    xs, ts, ms = (_padded(a, n_pad).reshape(n_chunks, rows, *a.shape[1:]) for a in (x2, t, m))

    def body(i, carry):
        total, losses, dx, dw = carry
        s, loss, dx_c, dw_c = _chunk(xs[i], w, ts[i], ms[i], z_loss_weight)
        return total + s, losses.at[i].set(loss), dx.at[i].set(dx_c), dw + dw_c

    init = (jnp.zeros((), jnp.float32), jnp.zeros((n_chunks, rows), jnp.float32),
            jnp.zeros((n_chunks, rows, d), x2.dtype), jnp.zeros(w.shape, jnp.float32))
    total, losses, dx, dw = jax.lax.fori_loop(0, n_chunks, body, init)
    return total, losses.reshape(-1)[:n], dx.reshape(-1, d)[:n], dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_sum(x2, w, t, m, z_loss_weight, rows):
    per_token = chunked._ce(x2, w, t, z_loss_weight, chunked.default_vocab_chunk(x2.shape[0], w.shape[1]))
    return jnp.sum(m * per_token)


def _ce_sum_fwd(x2, w, t, m, z_loss_weight, rows):
    total, losses, dx, dw = _loss_and_grads(x2, w, t, m, z_loss_weight, rows)
    return total, (losses, dx, dw)


def _ce_sum_bwd(z_loss_weight, rows, res, g):
    losses, dx, dw = res
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, g * losses


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def cross_entropy_sum(x, w, targets, weights, *, z_loss_weight: float = 0.0, row_chunk: int | None = None):
    """``sum(weights * loss)`` as a float32 scalar; ``weights`` has the shape of ``targets``. See the module
    docstring."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    m = weights.reshape(-1).astype(jnp.float32)
    rows = min(int(row_chunk or default_row_chunk(x2.shape[0], w.shape[1])), x2.shape[0])
    return _ce_sum(x2, w, t, m, float(z_loss_weight), rows)
