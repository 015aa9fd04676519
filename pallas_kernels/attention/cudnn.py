"""cuDNN attention through JAX, with packed documents (segment ids).

Without segment ids: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (GQA native, causal flag).

With segment ids there are two routes:

* ``mode="mask"`` (default): a boolean [B, 1, S, S] mask (cuDNN turns it into an additive bias: memory O(B S^2));
  works for any ids. Verified against the reference on H100 (causal and not, GQA), fwd and grads.
* ``mode="packed"``: segment ids -> per-document start offsets and lengths, passed to cuDNN's packed
  ("THD" ragged) layout through ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` with
  ``q_offsets``/``kv_offsets``. No [S, S] mask is ever built. Assumes documents are contiguous runs of equal ids
  (packing); the padding run (id 0) is one more document, as in the reference (padding attends to padding).
  ``max_segments`` (static) bounds the number of runs per row (more runs than that are silently wrong); the
  default is the sequence length. Seen on H100 (jax 0.11.2): correct for B1 S1024 non-causal, but causal B2 S2048
  with ``max_segments=S`` asked for 96 GiB and failed, so this route is opt-in, not the default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.attention import reference

SAVE_NAME = "attention_out"  # the model's name for the attention output (litespark_jax.config.ACTIVATION_NAMES)


def with_named_residuals(fn, name: str = SAVE_NAME):
    """``fn`` with the residuals of its VJP named ``name``, so a remat policy that saves ``name`` keeps them.

    JAX's cuDNN attention is a custom VJP whose residuals (output, softmax statistics) are anonymous: under
    ``remat_policy=names`` the backward would rerun the whole forward kernel to rebuild them. Residuals that are
    the inputs themselves are left unnamed, so they are saved (or not) under the inputs' own names, never twice.
    Every array ``fn`` uses must be an argument (a custom VJP must not close over traced values, e.g. a mask).
    """

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        out, vjp = jax.vjp(fn, *args)
        inputs = {id(a) for a in args}
        vjp = jax.tree.map(lambda r: r if id(r) in inputs else checkpoint_name(r, name), vjp)
        return out, vjp

    def bwd(vjp, g):
        return vjp(g)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def segment_offsets(segment_ids, max_segments: int):
    """(offsets [B, M+1], lengths [B, M]) of the contiguous runs of ``segment_ids`` [B, S]; unused entries -1."""
    b, s = segment_ids.shape
    pos = jnp.arange(s, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1  # run index of each token
    n_runs = run[:, -1] + 1
    idx = jnp.where(starts, run, max_segments + 1)  # non-starts go to an overflow slot, cut below
    offsets = jnp.full((b, max_segments + 2), -1, jnp.int32)
    offsets = offsets.at[jnp.arange(b)[:, None], idx].set(jnp.broadcast_to(pos, (b, s)), mode="drop")
    offsets = offsets[:, : max_segments + 1]
    m = jnp.arange(max_segments + 1)[None, :]
    # The end of run r is the start of run r + 1 (or s for the last run).
    nxt = jnp.concatenate([offsets[:, 1:], jnp.full((b, 1), -1, jnp.int32)], axis=1)
    nxt = jnp.where(m + 1 == n_runs[:, None], s, nxt)
    lengths = jnp.where(m < n_runs[:, None], nxt - offsets, -1)[:, :max_segments]
    return offsets, lengths


def supports(q_shape, dtype, *, kv_shape=None, causal: bool = True, max_head_dim: int | None = None) -> str | None:
    """None if cuDNN's flash attention takes these inputs, else the reason it does not. jax 0.11's cuDNN route takes
    16-bit floats only (float32 raises deep inside jax), head dims that are multiples of 8 up to 128 (256 on
    Hopper), and, for a training step, even sequence lengths only (its call always carries a bias, and cuDNN refuses
    odd lengths with a bias in the backward; dispatch cannot tell a forward-only call, so odd lengths are refused).
    Causal attention with ``seq_q != seq_k`` is refused too: cuDNN aligns the causal diagonal top-left, the reference
    (and every other implementation here) bottom-right. ``max_head_dim`` given: that limit instead of this card's,
    without starting the backend (config validation)."""
    from pallas_kernels._dispatch import is_hopper

    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype must be bfloat16 or float16, not {jnp.dtype(dtype).name}"
    head_dim = q_shape[-1]
    if max_head_dim is None:
        max_head_dim = 256 if is_hopper() else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head_dim must be a multiple of 8 up to {max_head_dim}, not {head_dim}"
    if len(q_shape) == 4:
        seq_q = q_shape[1]
        seq_k = seq_q if kv_shape is None else kv_shape[1]
        if seq_q % 2 or seq_k % 2:
            return f"sequence lengths must be even (cuDNN's backward), not q {seq_q} / kv {seq_k}"
        if causal and seq_q != seq_k:
            return (f"causal attention needs seq_q == seq_k (cuDNN aligns the causal diagonal top-left, the "
                    f"reference bottom-right), not q {seq_q} / kv {seq_k}")
    return None


def attention(q, k, v, *, segment_ids=None, causal=True, softmax_scale=None, mode: str = "mask",
              max_segments: int | None = None):
    reason = supports(q.shape, q.dtype, kv_shape=k.shape, causal=causal)
    if reason is not None:
        raise ValueError(f"attention impl 'cudnn': {reason}; q {tuple(q.shape)} {jnp.dtype(q.dtype).name} "
                         "(impl='auto' or 'reference' takes these inputs)")
    if segment_ids is None:
        return with_named_residuals(functools.partial(
            jax.nn.dot_product_attention, is_causal=causal, scale=softmax_scale, implementation="cudnn"))(q, k, v)
    if mode == "mask":
        mask = reference.attention_mask(q.shape[1], k.shape[1], segment_ids, causal=False)
        return with_named_residuals(lambda q, k, v, mask: jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, scale=softmax_scale, implementation="cudnn"))(q, k, v, mask)
    from jax._src.cudnn import fused_attention_stablehlo as fa

    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    m = q.shape[1] if max_segments is None else max_segments
    offsets, lengths = segment_offsets(segment_ids.astype(jnp.int32), m)
    mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                    kv_offsets=offsets, scale=scale, mask_type=mask_type, qkv_layout="BTNH")
