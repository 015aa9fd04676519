"""Flash attention for Hopper in Pallas Mosaic GPU (FA3-style: wgmma, TMA, warp specialization).

Adapted from JAX's example ``jax/experimental/pallas/ops/gpu/attention_mgpu.py`` (Apache-2.0) and extended with:
bf16, a softmax scale, grouped-query attention without repeating K/V (the dK/dV kernel loops over the query heads
of a group and writes [B, S, KVH, D] directly), packed documents through ``segment_ids``, and a causal backward with
block skipping.

Layouts and semantics follow ``reference.py``. Forward: 3 warpgroups per CTA, two compute warpgroups of ``block_q``
query rows each (ping-ponged by a schedule barrier) and one memory warpgroup streaming K/V (and key segment ids)
through a ``max_concurrent_steps``-deep ring of SMEM buffers with TMA. Causal programs stop at the diagonal. The
log-sum-exp (base 2, of scores pre-multiplied by ``scale * log2(e)``) is saved for the backward.

Backward: two kernels, dQ (grid heads x q tiles x batch, K/V streamed; it also writes ``delta = rowsum(o * do)``)
and then dK/dV (grid kv heads x kv tiles x batch; Q, dO, lse, delta streamed for every query head of the group and
every query tile at or after the diagonal). ``Config(backward="fused")`` is the one-kernel form: the dK/dV kernel
hands dS^T to its third warpgroup, which adds dS K into a float32 dQ with TMA reductions (5 products instead of 7;
measured no faster on an H100, its L2 adds cost what the products save: docs/perf/attention.md, run 11).

With segment ids, each kernel visits only the blocks that hold its tile's documents, and runs the blocks wholly
inside a warpgroup's single document without the segment mask (``segment_clean_ranges``).

Masked scores use a large finite negative value instead of -inf, so a block where a whole row is masked (a packed
document that starts later) contributes nothing once a real key is seen. Requires seq_q == seq_k (self-attention:
every query row sees at least itself, so no row is empty), seq a multiple of 128, head_dim 64 or 128.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels._lowering import lowered_once
from pallas_kernels.env_config import replace_from_env

LOG2E = math.log2(math.e)
MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class Config:
    block_q: int = 64  # rows per compute warpgroup (forward); 2 compute warpgroups per CTA
    block_kv: int = 128
    max_concurrent_steps: int = 2
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64  # rows per compute warpgroup (dK/dV); 2 per CTA
    bwd_steps: int = 2
    # Register split per thread: 2 compute warpgroups x 128 threads x compute + 128 x memory <= 64K registers.
    compute_registers: int = 232
    memory_registers: int = 40
    # Backward: "two_kernels" (dQ and dK/dV kernels, each recomputing S and dP: 7 products per block pair) or
    # "fused" (the dK/dV kernel hands each step's dS^T to a dQ warpgroup through SMEM: 5 products; dQ is added
    # into a float32 buffer with TMA reductions). The fused kernel's own register split and dQ column chunk:
    backward: str = "two_kernels"
    fused_compute_registers: int = 216
    fused_dq_registers: int = 72
    fused_dq_cols: int = 64


# Up to this sequence length, head dim 128 runs with 240 / 24 registers per compute / memory thread instead of
# 232 / 40: 0.6-1.5% faster under sustained load at S 2048-4096 (docs/perf/attention.md, run 18), 13% slower at
# S 8192 (run 15).
SHORT_SEQ_REGISTERS_MAX = 4096


def default_config(head_dim: int, seq_len: int | None = None) -> Config:
    """The config for this head dim (and sequence length, where given), with the fields in ``ATTN_PALLAS_CONFIG``
    (JSON) changed for tuning runs."""
    steps = 3 if head_dim <= 64 else 2
    cfg = Config(block_q=64, block_kv=128, max_concurrent_steps=steps)
    if head_dim == 128 and seq_len is not None and seq_len <= SHORT_SEQ_REGISTERS_MAX:
        cfg = dataclasses.replace(cfg, compute_registers=240, memory_registers=24)
    return replace_from_env(cfg, "ATTN_PALLAS_CONFIG")


def supports(q_shape, kv_shape, dtype, config: Config | None = None) -> str | None:
    """None if the kernel handles these shapes, else the reason it does not."""
    if len(q_shape) != 4 or len(kv_shape) != 4:
        return "q/k/v must be 4-D"
    b, s, h, d = q_shape
    bk, sk, kvh, dk = kv_shape
    if (b, d) != (bk, dk):
        return f"batch/head_dim mismatch: q {tuple(q_shape)}, k/v {tuple(kv_shape)}"
    if s != sk:
        return f"seq_q {s} != seq_k {sk}"
    if h % kvh:
        return f"heads {h} not a multiple of kv_heads {kvh}"
    if d % 64 or d > 128:
        return f"head_dim must be 64 or 128, not {d}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype must be bfloat16 or float16, not {jnp.dtype(dtype).name}"
    cfg = config or default_config(d, s)
    if cfg.backward not in ("two_kernels", "fused"):
        return f"backward {cfg.backward!r} must be 'two_kernels' or 'fused'"
    for regs in ((cfg.compute_registers, cfg.memory_registers),
                 (cfg.fused_compute_registers, cfg.fused_dq_registers)):
        if any(r % 8 or not 24 <= r <= 256 for r in regs) or 2 * regs[0] + regs[1] > 504:
            return f"registers {regs} must be multiples of 8 in [24, 256] with 2 * compute + memory <= 504"
    if cfg.fused_dq_cols not in (64, 128):
        return f"fused_dq_cols {cfg.fused_dq_cols} must be 64 or 128"
    for blk in (2 * cfg.block_q, cfg.block_kv, 2 * cfg.block_q_dq, cfg.block_kv_dq, cfg.block_q_dkv,
                2 * cfg.block_kv_dkv):
        if s % blk:
            return f"seq {s} must be a multiple of {blk}"
    return None


def _interp(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


_TILING = plgpu.TilingTransform((8, 64))
_SWIZZLE = plgpu.SwizzleTransform(128)
# float32 tiles (dQ partials) staged for TMA: 128-byte rows swizzled, so the WGMMA-layout store is conflict-free.
_F32_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


def _smem(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=(_TILING, _SWIZZLE))


def _mma(acc, a, b, interpret, extra=None):
    """``acc + a @ b`` on the tensor cores (wgmma accumulating in place through ``pl.run_state``).

    GPU interpret mode (jax 0.11) interprets neither ``run_state_p`` nor a wgmma whose A operand is in registers
    (it wants SMEM refs for both operands), so there the product of the register operand ``a`` and the SMEM ref
    ``b`` is a plain ``jnp.dot`` (same dtypes, float32 accumulation). ``extra`` runs after the wgmma is issued
    (before it is awaited), as a scheduling hook.
    """
    if interpret:
        if extra is not None:
            extra()
        return acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)

    def body(ref):
        plgpu.wgmma(ref, a, b)
        if extra is not None:
            extra()
    return pl.run_state(body)(plgpu.ACC.init(acc))


def segment_spans(seg):
    """For each position: the first and the last position in its row holding the same segment id ([B, S] int32
    each). Works for any ids (not only contiguous runs); the first position also serves as a small id for the same
    document (below 2**24, so exact as the float32 the kernels compare)."""
    b, s = seg.shape
    order = jnp.argsort(seg, axis=1, stable=True)
    ids = jnp.take_along_axis(seg, order, axis=1)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    new = ids[:, 1:] != ids[:, :-1]
    is_start = jnp.concatenate([jnp.ones((b, 1), bool), new], axis=1)
    is_end = jnp.concatenate([new, jnp.ones((b, 1), bool)], axis=1)
    grp_start = lax.cummax(jnp.where(is_start, pos, 0), axis=1)
    grp_end = lax.cummin(jnp.where(is_end, pos, s - 1), axis=1, reverse=True)
    first_sorted = jnp.take_along_axis(order, grp_start, axis=1)  # stable sort: first position of the id
    last_sorted = jnp.take_along_axis(order, grp_end, axis=1)
    rows = jnp.arange(b)[:, None]
    first = jnp.zeros((b, s), jnp.int32).at[rows, order].set(first_sorted.astype(jnp.int32))
    last = jnp.zeros((b, s), jnp.int32).at[rows, order].set(last_sorted.astype(jnp.int32))
    return first, last


def segment_block_ranges(seg, tile: int, block: int, spans=None):
    """For each row tile of ``tile`` positions: the [lo, hi) range, in units of ``block``, of positions that share a
    segment id with some position of the tile. Works for any ids (not only contiguous runs). Returns two int32
    arrays [B, S // tile]. Attention is symmetric in this respect, so the same ranges serve queries (kv blocks to
    visit) and keys (q blocks to visit). ``spans``: ``segment_spans(seg)``, if already computed."""
    b, s = seg.shape
    first, last = segment_spans(seg) if spans is None else spans
    lo = first.reshape(b, s // tile, tile).min(-1) // block
    hi = (last.reshape(b, s // tile, tile).max(-1) + block) // block
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def segment_clean_ranges(seg, tile: int, block: int):
    """For each row tile of ``tile`` positions that holds a single segment id: the [lo, hi) range, in units of
    ``block``, of the blocks lying wholly inside the run of that id around the tile, where every query of the tile
    sees every key of the block and the kernels skip the segment mask. Tiles holding several ids get an empty range
    (0, 0). Returns two int32 arrays [B, S // tile].

    A packed row of long documents is mostly such pairs: with the mask on every block the kernels ran 24-40%
    slower on one document per row than without segment ids (H100, docs/perf/attention.md, run 14)."""
    b, s = seg.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    new = seg[:, 1:] != seg[:, :-1]
    is_start = jnp.concatenate([jnp.ones((b, 1), bool), new], axis=1)
    is_end = jnp.concatenate([new, jnp.ones((b, 1), bool)], axis=1)
    run_start = lax.cummax(jnp.where(is_start, pos, 0), axis=1)
    run_end = lax.cummin(jnp.where(is_end, pos, s - 1), axis=1, reverse=True)  # inclusive
    tiles = seg.reshape(b, s // tile, tile)
    single = (tiles == tiles[..., :1]).all(-1)
    lo = (run_start[:, ::tile] + block - 1) // block  # first block starting at or after the run's start
    hi = (run_end[:, tile - 1::tile] + 1) // block  # end of the last block ending at or before the run's end
    keep = single & (hi > lo)
    return jnp.where(keep, lo, 0).astype(jnp.int32), jnp.where(keep, hi, 0).astype(jnp.int32)


def _segment_loops(body, carry, lo, hi, clean_lo, clean_hi, causal: bool):
    """``body(i, carry, causal_mask=, seg_mask=)`` over [lo, hi): with the segment mask (and the causal one when
    ``causal``) before and after [clean_lo, clean_hi), with neither inside it."""
    a = jnp.minimum(jnp.maximum(clean_lo, lo), hi)
    b = jnp.minimum(jnp.maximum(clean_hi, a), hi)
    for start, end, masked in ((lo, a, True), (a, b, False), (b, hi, True)):
        step = functools.partial(body, causal_mask=causal and masked, seg_mask=masked)
        carry = lax.fori_loop(start, end, step, carry)
    return carry


def _seg_inputs(seg, batch_size, seq_len, tile, block, wg_tile):
    """The segment ids as float32 (TMA-loaded beside the tiles), each ``tile``'s [lo, hi) range of ``block``s to
    visit, and each ``wg_tile``'s (one compute warpgroup's rows) [lo, hi) range of blocks without a segment mask.
    The kernels compare ids as float32, so each id is replaced by its first position in the row: ids of 2**24 and
    above (global document ids, hashes) would otherwise round to equal values and let documents see each other."""
    if seg is None:
        dummy = jnp.zeros((batch_size, seq_len // tile), jnp.int32)
        wg_dummy = jnp.zeros((batch_size, seq_len // wg_tile), jnp.int32)
        return jnp.zeros((batch_size, seq_len), jnp.float32), dummy, dummy, wg_dummy, wg_dummy
    spans = segment_spans(seg)
    lo, hi = segment_block_ranges(seg, tile, block, spans)
    clean_lo, clean_hi = segment_clean_ranges(seg, wg_tile, block)
    return spans[0].astype(jnp.float32), lo, hi, clean_lo, clean_hi


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@lowered_once("causal", "scale", "cfg", "interpret")
def _forward(q, k, v, seg, *, causal: bool, scale: float, cfg: Config, interpret=None):
    batch_size, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype
    has_seg = seg is not None
    block_q, block_kv = cfg.block_q, cfg.block_kv
    max_steps = min(cfg.max_concurrent_steps, seq_len // block_kv)
    c = scale * LOG2E  # scores -> base-2 logits
    compute_wgs = 2

    num_q_tiles = seq_len // (2 * block_q)

    def kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, lo_ref, hi_ref, clo_ref, chi_ref, out_ref, lse_ref, scoped):
        batch = lax.axis_index("batch")
        q_head = lax.axis_index("heads")
        wg_idx = lax.axis_index("wg")
        # Heaviest causal tiles first (the grid launches q tiles in order), for a shorter tail.
        q_tile = num_q_tiles - 1 - lax.axis_index("q_seq")
        smem_buffers, buffer_barriers, consumed_barriers, schedule_barrier = scoped
        qo_smem2, k_smem, v_smem, lse_smem2, segq_smem2, segk_smem = smem_buffers
        k_barriers, v_barriers, q_barriers, segk_barriers, segq_barriers = buffer_barriers
        k_consumed_barriers, v_consumed_barriers = consumed_barriers

        def perform_schedule_barrier():
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        if causal:
            block_q_end = (q_tile + 1) * (2 * block_q)
            block_max_kv_steps = pl.cdiv(block_q_end, jnp.array(block_kv, jnp.int32))
        else:
            block_max_kv_steps = seq_len // block_kv
        # Python ints when static: a concrete jax array closed over by ``pl.run_state`` breaks the Mosaic lowering.
        if has_seg:  # only the kv blocks that hold keys of this tile's documents
            lo = lo_ref[batch, q_tile]
            block_max_kv_steps = jnp.minimum(block_max_kv_steps, hi_ref[batch, q_tile])
        else:
            lo = 0

        @pl.when(wg_idx < 2)
        def _compute_wg():
            plgpu.set_max_registers(cfg.compute_registers, action="increase")
            qo_smem = qo_smem2.at[wg_idx]
            lse_smem = lse_smem2.at[wg_idx]
            q_seq_base = q_tile * (2 * block_q) + wg_idx * block_q

            if causal:
                kv_steps = jnp.minimum(pl.cdiv(q_seq_base + block_q, jnp.array(block_kv, jnp.int32)),
                                       block_max_kv_steps)
            else:
                kv_steps = block_max_kv_steps

            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_seq_base, block_q), q_head], qo_smem,
                                    q_barriers.at[wg_idx])
            if has_seg:
                segq_smem = segq_smem2.at[wg_idx]
                plgpu.copy_gmem_to_smem(segq_ref.at[batch, pl.ds(q_seq_base, block_q)], segq_smem,
                                        segq_barriers.at[wg_idx])
                plgpu.barrier_wait(segq_barriers.at[wg_idx])
                segq = plgpu.load(segq_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(q_barriers.at[wg_idx])

            m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, dtype=jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((block_q,), 0, dtype=jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(kv_steps > lo)
            def _():
                plgpu.barrier_wait(k_barriers.at[0])

            pl.when(wg_idx == 1)(perform_schedule_barrier)

            def kv_loop(kv_step, carry, causal_mask: bool = False, seg_mask: bool = has_seg):
                acc, m_i, l_i = carry
                slot = lax.rem(kv_step - lo, jnp.array(max_steps, kv_step.dtype))

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    perform_schedule_barrier()
                    return acc_ref[...]

                qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
                mask = None
                if has_seg:
                    plgpu.barrier_wait(segk_barriers.at[slot])  # every step observes its load's phase
                if seg_mask:
                    segk = plgpu.load(segk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    mask = (lax.broadcast_in_dim(segq, qk.shape, [0])
                            == lax.broadcast_in_dim(segk, qk.shape, [1]))
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])
                if causal_mask:
                    q_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
                    kv_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
                    cmask = (q_ids + q_seq_base) >= (kv_ids + kv_step * block_kv)
                    mask = cmask if mask is None else (mask & cmask)
                if mask is not None:
                    # Mask after scaling: a row masked so far has s == m exactly (p = 1, wiped by alpha = 0 at its
                    # first real key). Masking before an FMA-fused ``qk * c - m`` would leave a rounding residual
                    # of ~1e22 in the exponent.
                    s = jnp.where(mask, qk * c, MASK_VALUE)
                    m_ij = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
                else:
                    # We keep m scaled by log2(e) * scale so p is one FMA per element.
                    m_ij = jnp.maximum(m_i, qk.max(axis=1) * c)
                    p = jnp.exp2(qk * c - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
                alpha = jnp.exp2(m_i - m_ij)
                m_i = m_ij
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i *= alpha
                p16 = p.astype(dtype)

                def end_softmax_barriers():
                    plgpu.barrier_arrive(schedule_barrier)
                    plgpu.barrier_wait(v_barriers.at[slot])
                    plgpu.barrier_wait(schedule_barrier)

                l_i += p.sum(axis=1)
                acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
                end_softmax_barriers()

                def wait_next_k():
                    wait_step = kv_step + 1
                    wait_slot = lax.rem(wait_step - lo, jnp.array(max_steps, kv_step.dtype))

                    @pl.when(wait_step < kv_steps)
                    def _wait():
                        plgpu.barrier_wait(k_barriers.at[wait_slot])

                acc = _mma(acc, p16, v_smem.at[slot], interpret, extra=wait_next_k)
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                return acc, m_i, l_i

            def epilogue_kv_loop(kv_step, _):
                # Flush the pipelined K/V this warpgroup does not need (its causal range ended earlier).
                slot = lax.rem(kv_step - lo, jnp.array(max_steps, kv_step.dtype))
                plgpu.barrier_wait(k_barriers.at[slot])
                plgpu.barrier_wait(v_barriers.at[slot])
                if has_seg:
                    plgpu.barrier_wait(segk_barriers.at[slot])
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                perform_schedule_barrier()
                perform_schedule_barrier()

            if has_seg:  # the blocks inside this warpgroup's document (and below the diagonal) without a mask
                wg_tile = lax.div(q_seq_base, jnp.array(block_q, jnp.int32))
                clean_hi = chi_ref[batch, wg_tile]
                if causal:
                    clean_hi = jnp.minimum(clean_hi, lax.div(q_seq_base, jnp.array(block_kv, jnp.int32)))
                acc, m_i, l_i = _segment_loops(kv_loop, (acc, m_i, l_i), lo, kv_steps, clo_ref[batch, wg_tile],
                                               clean_hi, causal)
            elif not causal:
                acc, m_i, l_i = lax.fori_loop(lo, block_max_kv_steps, kv_loop, (acc, m_i, l_i))
            else:
                full_kv_steps = lax.div(q_seq_base, jnp.array(block_kv, jnp.int32))
                acc, m_i, l_i = lax.fori_loop(0, full_kv_steps, kv_loop, (acc, m_i, l_i))
                acc, m_i, l_i = lax.fori_loop(full_kv_steps, kv_steps,
                                              functools.partial(kv_loop, causal_mask=True), (acc, m_i, l_i))
            if causal:
                lax.fori_loop(kv_steps, block_max_kv_steps, epilogue_kv_loop, None)
            pl.when(wg_idx == 0)(perform_schedule_barrier)

            acc *= lax.broadcast_in_dim(1.0 / l_i, (block_q, head_dim), [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem[...] = m_i + jnp.log(l_i) * LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_seq_base, block_q), q_head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, q_head, pl.ds(q_seq_base, block_q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(cfg.memory_registers, action="decrease")
            kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

            def load(step, slot):
                s = (batch, pl.ds(step * block_kv, block_kv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[slot], k_barriers.at[slot])
                if has_seg:
                    plgpu.copy_gmem_to_smem(segk_ref.at[batch, pl.ds(step * block_kv, block_kv)],
                                            segk_smem.at[slot], segk_barriers.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[slot], v_barriers.at[slot])

            for i in range(max_steps):
                pl.when(lo + i < block_max_kv_steps)(functools.partial(load, lo + i, i))

            @pl.loop(0, block_max_kv_steps - lo - max_steps)
            def _kv_loop(j):
                tma_step = lo + j + max_steps
                tma_slot = lax.rem(j, jnp.array(max_steps, j.dtype))
                s = (batch, pl.ds(tma_step * block_kv, block_kv), kv_head)
                plgpu.barrier_wait(k_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[tma_slot], k_barriers.at[tma_slot])
                if has_seg:
                    plgpu.copy_gmem_to_smem(segk_ref.at[batch, pl.ds(tma_step * block_kv, block_kv)],
                                            segk_smem.at[tma_slot], segk_barriers.at[tma_slot])
                plgpu.barrier_wait(v_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[tma_slot], v_barriers.at[tma_slot])

            # Drain: observe the last consumptions so every barrier phase is seen before the CTA exits.
            @pl.loop(jnp.maximum(block_max_kv_steps - max_steps, lo), block_max_kv_steps)
            def _drain(kv_step):
                slot = lax.rem(kv_step - lo, jnp.array(max_steps, kv_step.dtype))
                plgpu.barrier_wait(k_consumed_barriers.at[slot])
                plgpu.barrier_wait(v_consumed_barriers.at[slot])

    def entry(q_ref, k_ref, v_ref, segq_ref, segk_ref, lo_ref, hi_ref, clo_ref, chi_ref, out_ref, lse_ref):
        scratch = [
            _smem((compute_wgs, block_q, head_dim), dtype),
            _smem((max_steps, block_kv, head_dim), dtype),
            _smem((max_steps, block_kv, head_dim), dtype),
            plgpu.SMEM((compute_wgs, block_q), jnp.float32),
            plgpu.SMEM((compute_wgs, block_q), jnp.float32) if has_seg else None,
            plgpu.SMEM((max_steps, block_kv), jnp.float32) if has_seg else None,
        ]
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, lo_ref, hi_ref, clo_ref, chi_ref, out_ref,
                                 lse_ref, args),
            scratch,
            (
                plgpu.Barrier(num_barriers=max_steps),
                plgpu.Barrier(num_barriers=max_steps),
                plgpu.Barrier(num_barriers=compute_wgs),
                plgpu.Barrier(num_barriers=max_steps) if has_seg else None,
                plgpu.Barrier(num_barriers=compute_wgs) if has_seg else None,
            ),
            (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_steps),) * 2,
            plgpu.Barrier(num_arrivals=compute_wgs),
            collective_axes="wg",
        )

    out_shape = [q, jax.ShapeDtypeStruct((batch_size, num_q_heads, seq_len), jnp.float32)]
    segf, lo, hi, clean_lo, clean_hi = _seg_inputs(seg, batch_size, seq_len, 2 * block_q, block_kv, block_q)
    out, lse = plgpu.kernel(
        entry,
        out_type=out_shape,
        grid=(num_q_heads, num_q_tiles, batch_size),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interp(interpret),
    )(q, k, v, segf, segf, lo, hi, clean_lo, clean_hi)
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# Backward: dQ
# ----------------------------------------------------------------------------------------------------------------
@lowered_once("causal", "scale", "cfg", "interpret")
def _backward_dq(q, k, v, do, lse, out, seg, *, causal, scale, cfg: Config, interpret=None):
    """dQ, and ``delta = rowsum(out * do)`` [B, H, S] for the dK/dV kernel: each CTA forms its rows' delta from
    the dO tile it loads anyway and the output tile, instead of a separate XLA pass over both."""
    batch_size, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype
    has_seg = seg is not None
    block_q, block_kv = cfg.block_q_dq, cfg.block_kv_dq
    max_steps = min(cfg.bwd_steps, seq_len // block_kv)
    c = scale * LOG2E
    compute_wgs = 2

    num_q_tiles = seq_len // (2 * block_q)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, o_ref, segq_ref, segk_ref, lo_ref, hi_ref, clo_ref, chi_ref,
               dq_ref, delta_ref, smem, own_barriers, kv_barriers, consumed):
        q_smem2, do_smem2, lse_smem2, o_smem2, delta_smem2, segq_smem2, k_smem, v_smem, segk_smem = smem
        k_barriers, v_barriers, segk_barriers = kv_barriers
        batch = lax.axis_index("batch")
        q_head = lax.axis_index("heads")
        wg_idx = lax.axis_index("wg")
        q_tile = num_q_tiles - 1 - lax.axis_index("q_seq")  # heaviest causal tiles first
        if causal:
            max_kv_steps = pl.cdiv((q_tile + 1) * (2 * block_q), jnp.array(block_kv, jnp.int32))
        else:
            max_kv_steps = seq_len // block_kv
        if has_seg:
            lo = lo_ref[batch, q_tile]
            max_kv_steps = jnp.minimum(max_kv_steps, hi_ref[batch, q_tile])
        else:
            lo = 0

        @pl.when(wg_idx < 2)
        def _compute_wg():
            plgpu.set_max_registers(cfg.compute_registers, action="increase")
            q_smem, do_smem = q_smem2.at[wg_idx], do_smem2.at[wg_idx]
            lse_smem, o_smem, delta_smem = lse_smem2.at[wg_idx], o_smem2.at[wg_idx], delta_smem2.at[wg_idx]
            q_seq_base = q_tile * (2 * block_q) + wg_idx * block_q
            q_slice = (batch, pl.ds(q_seq_base, block_q), q_head)
            rows = (batch, q_head, pl.ds(q_seq_base, block_q))
            own = [(q_ref.at[q_slice], q_smem), (do_ref.at[q_slice], do_smem), (lse_ref.at[rows], lse_smem),
                   (o_ref.at[q_slice], o_smem)]
            if has_seg:
                own.append((segq_ref.at[batch, pl.ds(q_seq_base, block_q)], segq_smem2.at[wg_idx]))
            for j, (src, dst) in enumerate(own):
                plgpu.copy_gmem_to_smem(src, dst, own_barriers.at[j, wg_idx])
            for j in range(len(own)):
                plgpu.barrier_wait(own_barriers.at[j, wg_idx])
            lse = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            tile = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            delta = (tile(do_smem) * tile(o_smem)).sum(axis=1)
            delta_smem[...] = delta
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(delta_smem, delta_ref.at[rows])
            segq = plgpu.load(segq_smem2.at[wg_idx], layout=plgpu.Layout.WGMMA.reduce(1)) if has_seg else None

            if causal:
                kv_steps = jnp.minimum(pl.cdiv(q_seq_base + block_q, jnp.array(block_kv, jnp.int32)), max_kv_steps)
            else:
                kv_steps = max_kv_steps

            def kv_loop(kv_step, dq_acc, causal_mask: bool = False, seg_mask: bool = has_seg):
                slot = lax.rem(kv_step - lo, jnp.array(max_steps, kv_step.dtype))
                plgpu.barrier_wait(k_barriers.at[slot])
                plgpu.barrier_wait(v_barriers.at[slot])

                def compute_s_dp(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
                    return s_ref[...], dp_ref[...]

                s, dp = pl.run_scoped(compute_s_dp, plgpu.ACC((block_q, block_kv), jnp.float32),
                                      plgpu.ACC((block_q, block_kv), jnp.float32))
                mask = None
                if has_seg:
                    plgpu.barrier_wait(segk_barriers.at[slot])  # every step observes its load's phase
                if seg_mask:
                    segk = plgpu.load(segk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    mask = (lax.broadcast_in_dim(segq, s.shape, [0]) == lax.broadcast_in_dim(segk, s.shape, [1]))
                if causal_mask:
                    q_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    kv_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    cmask = (q_ids + q_seq_base) >= (kv_ids + kv_step * block_kv)
                    mask = cmask if mask is None else (mask & cmask)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))

                dq_acc = _mma(dq_acc, ds.astype(dtype), k_smem.at[slot], interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dq_acc

            dq_acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)
            full_kv_steps = lax.div(q_seq_base, jnp.array(block_kv, jnp.int32))
            if has_seg:  # the blocks inside this warpgroup's document (and below the diagonal) without a mask
                wg_tile = lax.div(q_seq_base, jnp.array(block_q, jnp.int32))
                clean_hi = chi_ref[batch, wg_tile]
                if causal:
                    clean_hi = jnp.minimum(clean_hi, full_kv_steps)
                dq_acc = _segment_loops(kv_loop, dq_acc, lo, kv_steps, clo_ref[batch, wg_tile], clean_hi, causal)
            elif not causal:
                dq_acc = lax.fori_loop(lo, kv_steps, kv_loop, dq_acc)
            else:
                dq_acc = lax.fori_loop(0, full_kv_steps, kv_loop, dq_acc)
                dq_acc = lax.fori_loop(full_kv_steps, kv_steps, functools.partial(kv_loop, causal_mask=True), dq_acc)
            if causal:
                @pl.loop(kv_steps, max_kv_steps)
                def _epilogue(kv_step):
                    slot = lax.rem(kv_step - lo, jnp.array(max_steps, kv_step.dtype))
                    plgpu.barrier_wait(k_barriers.at[slot])
                    plgpu.barrier_wait(v_barriers.at[slot])
                    if has_seg:
                        plgpu.barrier_wait(segk_barriers.at[slot])
                    plgpu.barrier_arrive(consumed.at[slot])

            q_smem[...] = (dq_acc * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[q_slice])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(cfg.memory_registers, action="decrease")
            kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

            def load(step, slot):
                s = (batch, pl.ds(step * block_kv, block_kv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[slot], k_barriers.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[slot], v_barriers.at[slot])
                if has_seg:
                    plgpu.copy_gmem_to_smem(segk_ref.at[batch, pl.ds(step * block_kv, block_kv)],
                                            segk_smem.at[slot], segk_barriers.at[slot])

            for i in range(max_steps):
                pl.when(lo + i < max_kv_steps)(functools.partial(load, lo + i, i))

            @pl.loop(lo + max_steps, max_kv_steps)
            def _loop(step):
                slot = lax.rem(step - lo, jnp.array(max_steps, step.dtype))
                plgpu.barrier_wait(consumed.at[slot])
                load(step, slot)

            @pl.loop(jnp.maximum(max_kv_steps - max_steps, lo), max_kv_steps)
            def _drain(step):
                plgpu.barrier_wait(consumed.at[lax.rem(step - lo, jnp.array(max_steps, step.dtype))])

    n_own = 5 if has_seg else 4
    scratch = [
        (
            _smem((compute_wgs, block_q, head_dim), dtype),
            _smem((compute_wgs, block_q, head_dim), dtype),
            plgpu.SMEM((compute_wgs, block_q), jnp.float32),
            _smem((compute_wgs, block_q, head_dim), dtype),
            plgpu.SMEM((compute_wgs, block_q), jnp.float32),
            plgpu.SMEM((compute_wgs, block_q), jnp.float32) if has_seg else None,
            _smem((max_steps, block_kv, head_dim), dtype),
            _smem((max_steps, block_kv, head_dim), dtype),
            plgpu.SMEM((max_steps, block_kv), jnp.float32) if has_seg else None,
        ),
        plgpu.Barrier(num_barriers=(n_own, compute_wgs)),
        (plgpu.Barrier(num_barriers=max_steps), plgpu.Barrier(num_barriers=max_steps),
         plgpu.Barrier(num_barriers=max_steps) if has_seg else None),
        plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_steps),
    ]
    segf, lo, hi, clean_lo, clean_hi = _seg_inputs(seg, batch_size, seq_len, 2 * block_q, block_kv, block_q)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((batch_size, num_q_heads, seq_len), jnp.float32)),
        scratch_types=scratch,
        grid=(num_q_heads, seq_len // (2 * block_q), batch_size),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interp(interpret),
    )(q, k, v, do, lse, out, segf, segf, lo, hi, clean_lo, clean_hi)


# ----------------------------------------------------------------------------------------------------------------
# Backward: dK, dV (GQA-native: loops over the query heads of the group)
# ----------------------------------------------------------------------------------------------------------------
@lowered_once("causal", "scale", "cfg", "interpret", "with_dq")
def _backward_dkv(q, k, v, do, lse, delta, seg, *, causal, scale, cfg: Config, interpret=None,
                  with_dq: bool = False):
    """dK and dV; with ``with_dq`` also dQ, so the backward is this one kernel (``Config.backward == "fused"``).

    Each CTA owns 2 x ``block_kv_dkv`` keys (one half per compute warpgroup) and walks the query blocks of every
    head of its group. The fused form removes the dQ kernel's recomputation of S and dP (5 products per block pair
    instead of 7) without putting dQ on the compute warpgroups' critical path (run 5 in docs/perf/attention.md
    did, and lost): each step they store their half of dS^T to SMEM and signal; the third warpgroup, which also
    issues the TMA loads, multiplies dS by the CTA's K in ``fused_dq_cols`` column chunks and adds each float32
    product into a [B, S, H, D] buffer with a TMA reduction (an add in L2, so CTAs on different key tiles need no
    locks). dS^T has two SMEM slots, so the compute warpgroups run up to one step ahead of the dQ products. GPU
    interpret mode has no TMA reductions: there each key tile writes its own slice of a [tiles, B, S, H, D]
    buffer, summed afterwards.
    """
    batch_size, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype
    has_seg = seg is not None
    block_q, block_kv = cfg.block_q_dkv, cfg.block_kv_dkv
    num_q_blocks = seq_len // block_q
    num_kv_tiles = seq_len // (2 * block_kv)
    max_steps = cfg.bwd_steps
    c = scale * LOG2E
    compute_wgs = 2
    interpreting = bool(interpret)
    if with_dq:
        compute_regs, other_regs = cfg.fused_compute_registers, cfg.fused_dq_registers
        dq_cols = min(cfg.fused_dq_cols, head_dim)
        dq_parts = head_dim // dq_cols
    else:
        compute_regs, other_regs = cfg.compute_registers, cfg.memory_registers

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, lo_ref, hi_ref, clo_ref, chi_ref,
               *refs):
        if with_dq:
            dq_acc_ref, dk_ref, dv_ref, smem, own_barriers, q_barriers, consumed, ds_ready, ds_free = refs
            k_smem2, v_smem2, segk_smem2, q_smem, do_smem, lse_smem, delta_smem, segq_smem, dsT_smem, dq_smem = smem
        else:
            dk_ref, dv_ref, smem, own_barriers, q_barriers, consumed = refs
            k_smem2, v_smem2, segk_smem2, q_smem, do_smem, lse_smem, delta_smem, segq_smem = smem
        batch = lax.axis_index("batch")
        kv_head = lax.axis_index("heads")
        wg_idx = lax.axis_index("wg")
        kv_tile = lax.axis_index("kv_seq")
        tile_base = kv_tile * (2 * block_kv)
        if causal:
            start_min = lax.div(tile_base, jnp.array(block_q, jnp.int32))
        else:
            start_min = 0
        if has_seg:  # only the q blocks that hold queries of this tile's documents
            start_min = jnp.maximum(start_min, lo_ref[batch, kv_tile])
            q_end = jnp.minimum(hi_ref[batch, kv_tile], num_q_blocks)
        else:
            q_end = num_q_blocks
        n_per = q_end - start_min  # q blocks visited per query head
        total = n_per * group

        @pl.when(wg_idx < 2)
        def _compute_wg():
            plgpu.set_max_registers(compute_regs, action="increase")
            k_smem, v_smem = k_smem2.at[wg_idx], v_smem2.at[wg_idx]
            kv_base = tile_base + wg_idx * block_kv
            kv_slice = (batch, pl.ds(kv_base, block_kv), kv_head)
            own = [(k_ref.at[kv_slice], k_smem), (v_ref.at[kv_slice], v_smem)]
            if has_seg:
                own.append((segk_ref.at[batch, pl.ds(kv_base, block_kv)], segk_smem2.at[wg_idx]))
            for j, (src, dst) in enumerate(own):
                plgpu.copy_gmem_to_smem(src, dst, own_barriers.at[j, wg_idx])
            for j in range(len(own)):
                plgpu.barrier_wait(own_barriers.at[j, wg_idx])
            segk = plgpu.load(segk_smem2.at[wg_idx], layout=plgpu.Layout.WGMMA.reduce(1)) if has_seg else None

            if causal:
                start = lax.div(kv_base, jnp.array(block_q, jnp.int32))
                full_start = jnp.minimum(pl.cdiv(kv_base + block_kv, jnp.array(block_q, jnp.int32)), q_end)
            else:
                start = start_min
                full_start = start_min
            if has_seg:  # masked, then the q blocks inside this warpgroup's document (and past the diagonal), masked
                start = jnp.minimum(jnp.maximum(start, start_min), q_end)
                wg_tile = lax.div(kv_base, jnp.array(block_kv, jnp.int32))
                clean_lo = clo_ref[batch, wg_tile]
                if causal:
                    clean_lo = jnp.maximum(clean_lo, full_start)
                clean_hi = chi_ref[batch, wg_tile]

            def wait_inputs(slot):
                for j in range(5 if has_seg else 4):
                    plgpu.barrier_wait(q_barriers.at[j, slot])

            def hand_off_dsT(t, dsT):
                """Give step t's half of dS^T to the dQ warpgroup (two slots: wait until it read slot t - 2)."""
                buf = lax.rem(t, jnp.array(2, t.dtype))

                @pl.when(t >= 2)
                def _():
                    plgpu.barrier_wait(ds_free.at[buf])

                dsT_smem.at[buf, wg_idx][...] = dsT
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[buf])

            def step(g, i, carry, causal_mask: bool = False, seg_mask: bool = has_seg):
                dk_acc, dv_acc = carry
                t = g * n_per + (i - start_min)
                slot = lax.rem(t, jnp.array(max_steps, t.dtype))
                wait_inputs(slot)

                def compute_sT(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                sT = pl.run_scoped(compute_sT, plgpu.ACC((block_kv, block_q), jnp.float32))
                lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                pT = jnp.exp2(sT * c - lax.broadcast_in_dim(lse, sT.shape, [1]))
                mask = None
                if seg_mask:
                    segq = plgpu.load(segq_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    mask = (lax.broadcast_in_dim(segk, sT.shape, [0]) == lax.broadcast_in_dim(segq, sT.shape, [1]))
                if causal_mask:
                    kv_ids = plgpu.broadcasted_iota(jnp.int32, sT.shape, 0, layout=plgpu.Layout.WGMMA)
                    q_ids = plgpu.broadcasted_iota(jnp.int32, sT.shape, 1, layout=plgpu.Layout.WGMMA)
                    cmask = (q_ids + i * block_q) >= (kv_ids + kv_base)
                    mask = cmask if mask is None else (mask & cmask)
                if mask is not None:
                    pT = jnp.where(mask, pT, 0.0)

                if interpret:  # see _mma
                    dv_acc = _mma(dv_acc, pT.astype(dtype), do_smem.at[slot], interpret)

                    def compute_dpT(ref):
                        plgpu.wgmma(ref, v_smem, do_smem.at[slot].transpose((1, 0)))
                        return ref[...]

                    dpT = pl.run_scoped(compute_dpT, plgpu.ACC((block_kv, block_q), jnp.float32))
                else:
                    def compute_dv_dpT(refs):
                        dv_ref_, dpT_ref = refs
                        plgpu.wgmma(dv_ref_, pT.astype(dtype), do_smem.at[slot])
                        plgpu.wgmma(dpT_ref, v_smem, do_smem.at[slot].transpose((1, 0)))

                    zeros = plgpu.layout_cast(jnp.full((block_kv, block_q), 0, dtype=jnp.float32),
                                              plgpu.Layout.WGMMA)
                    dv_acc, dpT = pl.run_state(compute_dv_dpT)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(zeros)))
                delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                dsT = (pT * (dpT - lax.broadcast_in_dim(delta, sT.shape, [1]))).astype(dtype)
                if with_dq:
                    hand_off_dsT(t, dsT)

                dk_acc = _mma(dk_acc, dsT, q_smem.at[slot], interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dk_acc, dv_acc

            def head_loop(g, carry):
                @pl.loop(start_min, start)
                def _skip(i):  # fully masked for this warpgroup's keys (causal diagonal)
                    t = g * n_per + (i - start_min)
                    slot = lax.rem(t, jnp.array(max_steps, t.dtype))
                    wait_inputs(slot)
                    if with_dq:
                        zeros = plgpu.layout_cast(jnp.full((block_kv, block_q), 0, dtype=dtype), plgpu.Layout.WGMMA)
                        hand_off_dsT(t, zeros)
                    plgpu.barrier_arrive(consumed.at[slot])

                if has_seg:
                    return _segment_loops(functools.partial(step, g), carry, start, q_end, clean_lo, clean_hi, causal)
                carry = lax.fori_loop(start, full_start, lambda i, cr: step(g, i, cr, causal_mask=causal), carry)
                carry = lax.fori_loop(full_start, q_end, lambda i, cr: step(g, i, cr), carry)
                return carry

            zeros = plgpu.layout_cast(jnp.full((block_kv, head_dim), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)
            dk_acc, dv_acc = lax.fori_loop(0, group, head_loop, (zeros, zeros))
            if with_dq:  # the dQ warpgroup reads K until its last product: wait for it before reusing k_smem
                for back in (2, 1):
                    @pl.when(total - back >= 0)
                    def _():
                        plgpu.barrier_wait(ds_free.at[lax.rem(total - back, jnp.array(2, jnp.int32))])
            k_smem[...] = (dk_acc * scale).astype(dtype)
            v_smem[...] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[kv_slice], commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[kv_slice], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        def load(t, slot):
            n = jnp.asarray(n_per, jnp.int32)
            g = lax.div(t, n)
            i = start_min + lax.rem(t, n)
            h = kv_head * group + g
            rows = pl.ds(i * block_q, block_q)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, h], q_smem.at[slot], q_barriers.at[0, slot])
            plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, h], do_smem.at[slot], q_barriers.at[1, slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, h, rows], lse_smem.at[slot], q_barriers.at[2, slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, h, rows], delta_smem.at[slot], q_barriers.at[3, slot])
            if has_seg:
                plgpu.copy_gmem_to_smem(segq_ref.at[batch, rows], segq_smem.at[slot], q_barriers.at[4, slot])

        def refill_after(s):
            """Once both compute warpgroups passed step s, load step s + max_steps into its slot (if any is left)."""
            slot = s % max_steps  # s is a Python int for the last step when the step count is static
            plgpu.barrier_wait(consumed.at[slot])

            @pl.when(s + max_steps < total)
            def _():
                load(s + max_steps, slot)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(other_regs, action="decrease")
            for t0 in range(max_steps):
                pl.when(t0 < total)(functools.partial(load, jnp.int32(t0), t0))

            if not with_dq:
                pl.loop(0, total)(refill_after)
                return

            @pl.loop(0, total)
            def _dq_loop(t):
                pl.when(t >= 1)(lambda: refill_after(t - 1))  # before step t's dQ: its loads are more urgent
                buf = lax.rem(t, jnp.array(2, t.dtype))
                plgpu.barrier_wait(ds_ready.at[buf])
                n = jnp.asarray(n_per, jnp.int32)
                h = kv_head * group + lax.div(t, n)
                rows = pl.ds((start_min + lax.rem(t, n)) * block_q, block_q)
                for part in range(dq_parts):
                    cols = pl.ds(part * dq_cols, dq_cols)

                    def compute_dq(acc_ref):
                        for j in range(compute_wgs):
                            plgpu.wgmma(acc_ref, dsT_smem.at[buf, j].transpose((1, 0)), k_smem2.at[j, :, cols])
                        return acc_ref[...]

                    dq = pl.run_scoped(compute_dq, plgpu.ACC((block_q, dq_cols), jnp.float32))
                    if part == dq_parts - 1:
                        plgpu.barrier_arrive(ds_free.at[buf])
                    stage = lax.rem(t * dq_parts + part, jnp.array(2, t.dtype))
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the add that used this stage has read it
                    dq_smem.at[stage][...] = dq
                    plgpu.commit_smem()
                    if interpreting:
                        plgpu.copy_smem_to_gmem(dq_smem.at[stage], dq_acc_ref.at[kv_tile, batch, rows, h, cols])
                    else:
                        plgpu.copy_smem_to_gmem(dq_smem.at[stage], dq_acc_ref.at[batch, rows, h, cols],
                                                reduction_op="add")

            pl.when(total > 0)(lambda: refill_after(total - 1))  # observes the last step's release (loads nothing)
            plgpu.wait_smem_to_gmem(0)

    n_own = 3 if has_seg else 2
    n_in = 5 if has_seg else 4
    smem = [
        _smem((compute_wgs, block_kv, head_dim), dtype),
        _smem((compute_wgs, block_kv, head_dim), dtype),
        plgpu.SMEM((compute_wgs, block_kv), jnp.float32) if has_seg else None,
        _smem((max_steps, block_q, head_dim), dtype),
        _smem((max_steps, block_q, head_dim), dtype),
        plgpu.SMEM((max_steps, block_q), jnp.float32),
        plgpu.SMEM((max_steps, block_q), jnp.float32),
        plgpu.SMEM((max_steps, block_q), jnp.float32) if has_seg else None,
    ]
    barriers = [
        plgpu.Barrier(num_barriers=(n_own, compute_wgs)),
        plgpu.Barrier(num_barriers=(n_in, max_steps)),
        plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_steps),
    ]
    if with_dq:
        smem += [_smem((2, compute_wgs, block_kv, block_q), dtype),  # dS^T by step parity
                 plgpu.SMEM((2, block_q, dq_cols), jnp.float32, transforms=_F32_TRANSFORMS)]
        barriers += [plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=2),  # ds_ready
                     plgpu.Barrier(num_barriers=2)]  # ds_free
    segf, lo, hi, clean_lo, clean_hi = _seg_inputs(seg, batch_size, seq_len, 2 * block_kv, block_q, block_kv)
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    inputs = [q, k, v, do, lse, delta, segf, segf, lo, hi, clean_lo, clean_hi]
    if with_dq:
        if interpreting:
            dq_init = jnp.zeros((num_kv_tiles,) + q.shape, jnp.float32)
        else:
            # Zeros made from this layer's dO: a dependency-free zeros buffer is one XLA may place early (or merge
            # across layers), which kept ~5 GiB more live in the 3B training step and ran it out of memory.
            dq_init = do.astype(jnp.float32) * 0.0
        dq_acc = jax.new_ref(dq_init)
        inputs.append(dq_acc)
    dk, dv = plgpu.kernel(
        kernel,
        out_type=[kv_type, kv_type],
        scratch_types=[tuple(smem)] + barriers,
        grid=(num_kv_heads, num_kv_tiles, batch_size),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interp(interpret),
    )(*inputs)
    if not with_dq:
        return dk, dv
    dq = jax.freeze(dq_acc)
    if interpreting:
        dq = dq.sum(axis=0)
    return (dq * scale).astype(dtype), dk, dv


# ----------------------------------------------------------------------------------------------------------------
# custom_vjp wrapper
# ----------------------------------------------------------------------------------------------------------------
SAVE_NAME = "attention_out"  # the model's name for the attention output (litespark_jax.config.ACTIVATION_NAMES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, causal, scale, cfg, interpret):
    out, _ = _forward(q, k, v, seg, causal=causal, scale=scale, cfg=cfg, interpret=interpret)
    return out


def _flash_fwd(q, k, v, seg, causal, scale, cfg, interpret):
    out, lse = _forward(q, k, v, seg, causal=causal, scale=scale, cfg=cfg, interpret=interpret)
    # Under a remat policy, residuals a custom_vjp makes itself are recomputed unless named: without these names
    # the backward of a layer that "saves attention_out" would rerun this whole forward kernel to rebuild lse.
    out, lse = checkpoint_name(out, SAVE_NAME), checkpoint_name(lse, SAVE_NAME)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, scale, cfg, interpret, res, do):
    q, k, v, seg, out, lse = res
    do = do.astype(q.dtype)
    kw = dict(causal=causal, scale=scale, cfg=cfg, interpret=interpret)
    if cfg.backward == "fused":
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
        dq, dk, dv = _backward_dkv(q, k, v, do, lse, delta, seg, with_dq=True, **kw)
    else:
        dq, delta = _backward_dq(q, k, v, do, lse, out, seg, **kw)
        dk, dv = _backward_dkv(q, k, v, do, lse, delta, seg, **kw)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, *, segment_ids=None, causal: bool = True, softmax_scale: float | None = None,
              config: Config | None = None, interpret=False):
    """Flash attention (Pallas Mosaic GPU). Same signature and semantics as ``reference.attention``."""
    cfg = config or default_config(q.shape[-1], q.shape[1])
    why = supports(q.shape, k.shape, q.dtype, cfg)
    if why is not None:
        raise NotImplementedError(f"pallas attention: {why}; q {tuple(q.shape)}, k/v {tuple(k.shape)} "
                                  "(impl='auto' picks an implementation that takes these inputs)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _flash(q, k, v, segment_ids, bool(causal), scale, cfg, interpret or False)


def attention_with_lse(q, k, v, *, segment_ids=None, causal=True, softmax_scale=None, config=None,
                       interpret=False):
    """Forward only; returns (out, lse) with lse [B, H, S] in base 2 of the scaled scores (for tests)."""
    cfg = config or default_config(q.shape[-1], q.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _forward(q, k, v, segment_ids, causal=causal, scale=scale, cfg=cfg, interpret=interpret)
