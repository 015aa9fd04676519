"""Reference attention in plain JAX: the numerics every fast implementation is tested against.

Layouts: ``q`` [batch, seq, heads, head_dim]; ``k``, ``v`` [batch, seq, kv_heads, head_dim] with
``heads % kv_heads == 0`` (grouped-query attention: query head ``h`` reads kv head ``h // (heads // kv_heads)``).
``segment_ids`` [batch, seq] int32 marks packed documents: a query attends only to keys of its own segment; 0 is
padding. Scores and softmax run in float32; the output has ``q``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(seq_q: int, seq_k: int, segment_ids=None, causal: bool = True):
    """Boolean [batch or 1, 1, seq_q, seq_k] mask: True where a query may attend to a key."""
    mask = jnp.ones((1, 1, seq_q, seq_k), dtype=bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((seq_q, seq_k), dtype=bool), k=seq_k - seq_q)[None, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def attention(q, k, v, *, segment_ids=None, causal: bool = True, softmax_scale: float | None = None):
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    # Group the query heads by the kv head they share instead of repeating K/V in memory.
    qg = q.reshape(batch, seq_q, kv_heads, group, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(seq_q, k.shape[1], segment_ids, causal)[:, :, None]  # [b, 1, 1, q, s]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows with nothing to attend to (padding queries) get zeros, not a uniform average.
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)
