"""SwiGLU MLP whose gate/up matmul is a Pallas Mosaic GPU (Hopper wgmma + TMA) kernel with the SiLU(gate)*up epilogue.

Status: passes its tests in Mosaic GPU interpret mode on the CPU and its GPU test on an H100; timed on an H100 at
91.2% (3B) / 90.9% (1B) of the bf16 matmul rate forward+backward (docs/perf/kernels.md, run 3), so ``auto`` picks it
on Hopper.

The kernel is adapted from jax's ``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py`` (Apache 2.0, The JAX
Authors): a persistent, warp-specialized pipeline (one memory warpgroup issuing TMA loads, two compute warpgroups
issuing wgmma, each on half of the CTA's rows or columns, optionally in two-CTA clusters). The change is the
epilogue: the [d, 2, f] weight is first interleaved into [d, f/h, 2, h] blocks (h = half a warpgroup's column
tile), so one accumulator tile holds matching gate columns (left half) and up columns (right half); the epilogue
computes ``silu(gate) * up`` in float32 and writes ``h`` [N, f], and also writes the rounded gate and up tiles into
the [N, 2, f] pre-activation that the backward needs. The down projection and the whole backward are the XLA ones
of ``fused.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels._lowering import lowered_once
from pallas_kernels.env_config import replace_from_env
from pallas_kernels.mlp import _mgpu_matmul, fused, mosaic_gpu_bwd


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig:
    tile_m: int = 128  # rows of a warpgroup's accumulator
    tile_n: int = 128  # its columns: tile_n / 2 gate columns next to the matching tile_n / 2 up columns
    tile_k: int = 64
    max_concurrent_steps: int = 3
    epi_tile_m: int = 64  # a WGMMA accumulator slices in 64-row blocks
    epi_slots: int = 3  # SMEM staging tiles per warpgroup for the epilogue's h / gate / up stores
    grid_tile_width: int = 8
    # The CTA's two warpgroups one above the other (a 256 x 128 tile; "n": side by side, 128 x 256), and no
    # clusters (True: two CTAs on vertically adjacent tiles share each weight block by TMA multicast). jax's
    # example matmul was 4% faster with "n" and clusters on one H100 and slower on another; ours gained nothing
    # consistent in the 3B step (docs/perf/kernels.md, ninth session), so the default stays the first layout.
    wg_dimension: str = _mgpu_matmul.WG_M
    cluster_m: bool = False


def _kernel(x_gmem, w_gmem, h_gmem, gu_gmem, *, config: SwiGLUConfig):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    m, k = x_gmem.shape
    f = h_gmem.shape[1]
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    half = tile_n // 2
    epi_m, slots = config.epi_tile_m, config.epi_slots
    cta_tile_m, cta_tile_n = _mgpu_matmul.cta_tile(tile_m, tile_n, config.wg_dimension)
    wgs_along_n = cta_tile_n // tile_n
    cluster_tile_m = cta_tile_m * (2 if config.cluster_m else 1)
    m_iters, n_iters, k_iters = m // cluster_tile_m, 2 * f // cta_tile_n, k // tile_k

    out_transforms = _mgpu_matmul.tile_transforms(dtype, half)
    get_pipeline = functools.partial(_mgpu_matmul.pipeline, dtype=dtype, cta_tile_m=cta_tile_m,
                                     cta_tile_n=cta_tile_n, tile_k=tile_k, k_iters=k_iters,
                                     max_concurrent_steps=config.max_concurrent_steps, cluster_m=config.cluster_m)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, slots, epi_m, half), dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg_idx = lax.axis_index("wg")
        cta_idx = lax.axis_index("cluster")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
        def _mn_loop(loop_info):
            (lin_idx,) = loop_info.index
            m_idx, n_idx = plgpu.planar_snake(
                lin_idx, (m_iters, n_iters), 1, config.grid_tile_width  # 1: N is the grid's minor dimension
            )
            if config.cluster_m:
                m_idx = m_idx * 2 + cta_idx
            cta_m_slice = pl.ds(m_idx * cta_tile_m, cta_tile_m)
            cta_n_slice = pl.ds(n_idx * cta_tile_n, cta_tile_n)  # in the interleaved weight
            wg_m_slice, wg_n_slice = _mgpu_matmul.warpgroup_slices(wg_idx, tile_m, tile_n, config.wg_dimension)
            # This warpgroup's accumulator: rows from ``row0``, gate/up columns [col0, col0 + half) of f.
            if config.wg_dimension == _mgpu_matmul.WG_M:
                row0, col0 = m_idx * cta_tile_m + wg_idx * tile_m, n_idx * half
            else:
                row0, col0 = m_idx * cta_tile_m, (n_idx * wgs_along_n + wg_idx) * half
            cols = pl.ds(col0, half)

            def compute_context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    acc = acc_ref[...]
                    stores = 0
                    for epi_mi in range(tile_m // epi_m):
                        rows = slice(epi_mi * epi_m, (epi_mi + 1) * epi_m)
                        gate = acc[rows, :half]
                        up = acc[rows, half:]
                        hidden = gate / (1.0 + jnp.exp(-gate)) * up
                        g_rows = pl.ds(row0 + epi_mi * epi_m, epi_m)
                        for value, dst in ((hidden, h_gmem.at[g_rows, cols]), (gate, gu_gmem.at[g_rows, cols]),
                                           (up, gu_gmem.at[g_rows, pl.ds(f + col0, half)])):
                            slot = stores % slots
                            stores += 1
                            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)  # the slot's last store left
                            out_smem[wg_idx, slot] = value.astype(dtype)
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(out_smem.at[wg_idx, slot], dst)

            def mma_body(_, x_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem.at[wg_m_slice], w_smem.at[:, wg_n_slice])
                plgpu.wgmma_wait(0)
                return acc_ref

            get_pipeline(mma_body, compute_context)(
                x_gmem.at[cta_m_slice, :], w_gmem.at[:, cta_n_slice], allocations=pipeline_allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def default_config() -> SwiGLUConfig:
    """``SwiGLUConfig()``, or with the fields of the JSON in ``MLP_PALLAS_CONFIG`` changed (for tuning runs)."""
    return replace_from_env(SwiGLUConfig(), "MLP_PALLAS_CONFIG")


def supported(m: int, k: int, f: int, config: SwiGLUConfig | None = None, dtype=None) -> bool:
    """Whether [m, k] x [k, 2, f] tiles with ``config``; with ``dtype``, also that it is a 16-bit float (a float32
    operand would need twice the shared memory the pipeline is sized for)."""
    config = config or default_config()
    if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    cta_tile_m, cta_tile_n = _mgpu_matmul.cta_tile(config.tile_m, config.tile_n, config.wg_dimension)
    return (
        m % (cta_tile_m * (2 if config.cluster_m else 1)) == 0
        and (2 * f) % cta_tile_n == 0
        and k % config.tile_k == 0
        and config.tile_m % config.epi_tile_m == 0
        and config.epi_slots >= 1
    )


def interleave(w_gate_up, half: int):
    """[d, 2, f] -> [d, 2f] with columns in blocks [gate j*half:(j+1)*half | up j*half:(j+1)*half] for each j."""
    d, two, f = w_gate_up.shape
    return w_gate_up.reshape(d, two, f // half, half).transpose(0, 2, 1, 3).reshape(d, two * f)


def swiglu_gate_up(x2, w_gate_up, *, config: SwiGLUConfig | None = None, interpret=None):
    """(h [N, f], gate_up [N, 2, f]) for x2 [N, d] and w_gate_up [d, 2, f], both in x2's dtype."""
    return _swiglu_gate_up(x2, w_gate_up, config=config or default_config(), interpret=interpret)


@lowered_once("config", "interpret")
def _swiglu_gate_up(x2, w_gate_up, *, config: SwiGLUConfig, interpret):
    m, k = x2.shape
    _, _, f = w_gate_up.shape
    if not supported(m, k, f, config):
        raise ValueError(f"mlp/mosaic_gpu: shape N={m}, d={k}, f={f} does not tile with {config}")
    w_il = interleave(w_gate_up.astype(x2.dtype), config.tile_n // 2)
    out_type = (jax.ShapeDtypeStruct((m, f), x2.dtype), jax.ShapeDtypeStruct((m, 2 * f), x2.dtype))
    call = _mgpu_matmul.launch(_kernel, config, out_type, interpret, cluster_m=config.cluster_m)
    h, gu = call(x2, w_il)
    return h, gu.reshape(m, 2, f)


TRITON_BACKWARD = "triton"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _mlp(x2, w_gate_up, w_down, config, interpret, backward):
    h, _ = swiglu_gate_up(x2, w_gate_up, config=config, interpret=interpret)
    return fused.dot_rounded(h, w_down, x2.dtype)


def _mlp_fwd(x2, w_gate_up, w_down, config, interpret, backward):
    h, gu = swiglu_gate_up(x2, w_gate_up, config=config, interpret=interpret)
    out = fused.dot_rounded(h, w_down, x2.dtype)
    return out, (x2, checkpoint_name(gu, fused.GATE_UP_NAME), w_gate_up, w_down)


def _mlp_bwd(config, interpret, backward, res, dy):
    """``backward``: None (XLA: ``fused``'s), a ``mosaic_gpu_bwd.BackwardConfig`` (the ``dh`` matmul with the SwiGLU
    gradient in its epilogue) or ``TRITON_BACKWARD`` (XLA's ``dh`` matmul, then the one-pass Triton SwiGLU gradient)."""
    x2, gu, w_gate_up, w_down = res
    dy = dy.astype(x2.dtype)
    if isinstance(backward, mosaic_gpu_bwd.BackwardConfig):
        dgu, h = mosaic_gpu_bwd.swiglu_backward_fused(dy, w_down, gu, config=backward, interpret=interpret)
        return fused.matmul_grads(x2, dy, dgu, h, w_gate_up, w_down)
    if backward == TRITON_BACKWARD:
        from pallas_kernels.mlp import triton_kernel  # needs triton: imported only when asked for

        swiglu = functools.partial(triton_kernel.swiglu_backward, interpret=interpret is not None)
        return fused.backward(x2, dy, gu, w_gate_up, w_down, swiglu=swiglu)
    return fused.backward(x2, dy, gu, w_gate_up, w_down)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def mlp(x, w_gate_up, w_down, *, config: SwiGLUConfig | None = None,
        bwd_config: mosaic_gpu_bwd.BackwardConfig | None = None, triton_backward: bool = False, interpret=None):
    """Same contract as ``reference.mlp``; shapes that don't tile with ``config`` (or a float32 ``x``) fall back to
    ``fused``. The
    backward's SwiGLU gradient: with ``bwd_config``, inside the ``mosaic_gpu_bwd`` kernel (where it tiles); with
    ``triton_backward``, the one-pass Triton kernel (``triton_kernel.py``); else ``fused``'s two XLA passes."""
    config = config or default_config()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n, d, f = x2.shape[0], x2.shape[1], w_gate_up.shape[2]
    if not supported(n, d, f, config, x.dtype):
        return fused.mlp(x, w_gate_up, w_down)
    backward = TRITON_BACKWARD if triton_backward else None
    if bwd_config is not None and mosaic_gpu_bwd.supported(n, d, f, bwd_config):
        backward = bwd_config
    out = _mlp(x2, w_gate_up, w_down, config, interpret, backward)
    return out.reshape(*lead, w_down.shape[1])


def mlp_fused_backward(x, w_gate_up, w_down, *, interpret=None):
    """``mlp`` with the Pallas backward kernel (``mosaic_gpu_bwd``; registered as ``mosaic_gpu_fused_bwd``): slower
    than XLA's backward on an H100 (docs/perf/kernels.md, run 4), so ``auto`` does not pick it."""
    return mlp(x, w_gate_up, w_down, bwd_config=mosaic_gpu_bwd.BackwardConfig(), interpret=interpret)


def mlp_triton_backward(x, w_gate_up, w_down, *, interpret=None):
    """``mlp`` with the one-pass Triton SwiGLU gradient in the backward (registered as ``mosaic_gpu_triton_bwd``)."""
    return mlp(x, w_gate_up, w_down, triton_backward=True, interpret=interpret)
