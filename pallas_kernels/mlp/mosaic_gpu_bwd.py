"""The SwiGLU MLP's backward ``dh = dy W_down^T`` as a Pallas Mosaic GPU matmul with the SwiGLU gradient in its
epilogue: it writes ``dgu`` [N, 2f] and the rebuilt ``h`` [N, f] directly, so neither ``dh`` nor a separate
elementwise pass over the [N, 2, f] pre-activation goes through memory.

STATUS: correct in Mosaic GPU interpret mode on the CPU and lowers for CUDA (tests/kernels/test_mlp.py); NOT yet
compiled or timed on a GPU (written after the session's device time was spent). It is registered as
``mosaic_gpu_fused_bwd``, which ``auto`` never picks. Measured what it replaces, on an H100 (3B shape, per layer):
the cuBLAS ``dh`` matmul 1.31 ms plus the XLA passes for ``dgu`` 0.51 ms and ``h`` 0.28 ms. Next step:
``python3 -m pallas_kernels.bench --only mlp`` on the device, then the end-to-end bench with
``model.mlp_impl=mosaic_gpu_fused_bwd``.

Same pipeline as the forward kernel in ``mosaic_gpu.py`` (persistent, warp-specialized: one TMA warpgroup, two
wgmma warpgroups on half of the CTA's rows each). Epilogue, per ``epi_tile_m`` rows of a warpgroup's tile: TMA-load
the matching gate and up tiles of the saved pre-activation, compute in float32 (``dh`` rounded to the input dtype
first, as the XLA backward does) ``dg = dh u sig (1 + g (1 - sig))``, ``du = dh silu(g)``, ``h = silu(g) u``, and
TMA-store the three tiles. ``W_down`` is transposed by XLA first ([f, d] -> [d, f], 50 MB at the 3B shape).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._lowering import lowered_once
from pallas_kernels.mlp import _mgpu_matmul


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    tile_m: int = 128  # rows per compute warpgroup (the CTA covers 2 * tile_m rows)
    tile_n: int = 128  # columns of dh (of d_ff) per tile
    tile_k: int = 64
    max_concurrent_steps: int = 2  # with 3, the pipeline and the 6 staging tiles need 245 KB of SMEM (227 KB)
    epi_tile_m: int = 64  # a WGMMA accumulator slices in 64-row blocks (32 fails Mosaic GPU's layout inference)
    grid_tile_width: int = 8


def supported(m: int, k: int, f: int, config: BackwardConfig = BackwardConfig()) -> bool:
    return (m % (2 * config.tile_m) == 0 and f % config.tile_n == 0 and k % config.tile_k == 0
            and config.tile_m % config.epi_tile_m == 0)


def _kernel(dy_gmem, wdt_gmem, gu_gmem, dgu_gmem, h_gmem, *, config: BackwardConfig):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = dy_gmem.dtype
    m, k = dy_gmem.shape
    f = h_gmem.shape[1]
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    epi_m = config.epi_tile_m
    cta_tile_m = 2 * tile_m
    m_iters, n_iters, k_iters = m // cta_tile_m, f // tile_n, k // tile_k
    epi_transforms = _mgpu_matmul.tile_transforms(dtype, tile_n)
    get_pipeline = functools.partial(_mgpu_matmul.pipeline, dtype=dtype, cta_tile_m=cta_tile_m, cta_tile_n=tile_n,
                                     tile_k=tile_k, k_iters=k_iters,
                                     max_concurrent_steps=config.max_concurrent_steps)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(dy_gmem, wdt_gmem),
        # per compute warpgroup: gate (then dg), up (then du), h
        epi_smem=plgpu.SMEM((2, 3, epi_m, tile_n), dtype, transforms=epi_transforms),
        load_barriers=plgpu.Barrier(num_barriers=(2, 2)),  # [gate/up, warpgroup]
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, epi_smem, load_barriers):
        wg_idx = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
        def _mn_loop(loop_info):
            (lin_idx,) = loop_info.index
            m_idx, n_idx = plgpu.planar_snake(lin_idx, (m_iters, n_iters), 1, config.grid_tile_width)
            cta_m_slice = pl.ds(m_idx * cta_tile_m, cta_tile_m)
            cols = pl.ds(n_idx * tile_n, tile_n)
            up_cols = pl.ds(f + n_idx * tile_n, tile_n)
            wg_m_slice = pl.ds(wg_idx * tile_m, tile_m)
            gate_s, up_s, h_s = (epi_smem.at[wg_idx, i] for i in range(3))

            def compute_context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    acc = acc_ref[...]
                    for epi_mi in range(tile_m // epi_m):
                        rows = pl.ds(m_idx * cta_tile_m + wg_idx * tile_m + epi_mi * epi_m, epi_m)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores left the SMEM
                        plgpu.copy_gmem_to_smem(gu_gmem.at[rows, cols], gate_s, load_barriers.at[0, wg_idx])
                        plgpu.copy_gmem_to_smem(gu_gmem.at[rows, up_cols], up_s, load_barriers.at[1, wg_idx])
                        plgpu.barrier_wait(load_barriers.at[0, wg_idx])
                        plgpu.barrier_wait(load_barriers.at[1, wg_idx])
                        g = gate_s[...].astype(jnp.float32)
                        u = up_s[...].astype(jnp.float32)
                        dh = acc[epi_mi * epi_m:(epi_mi + 1) * epi_m, :].astype(dtype).astype(jnp.float32)
                        sig = 1.0 / (1.0 + jnp.exp(-g))
                        silu = g * sig
                        gate_s[...] = (dh * u * (sig * (1.0 + g * (1.0 - sig)))).astype(dtype)
                        up_s[...] = (dh * silu).astype(dtype)
                        h_s[...] = (silu * u).astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(gate_s, dgu_gmem.at[rows, cols])
                        plgpu.copy_smem_to_gmem(up_s, dgu_gmem.at[rows, up_cols])
                        plgpu.copy_smem_to_gmem(h_s, h_gmem.at[rows, cols])

            def mma_body(_, dy_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, dy_smem.at[wg_m_slice], w_smem)
                plgpu.wgmma_wait(0)
                return acc_ref

            get_pipeline(mma_body, compute_context)(
                dy_gmem.at[cta_m_slice, :], wdt_gmem.at[:, cols], allocations=pipeline_allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@lowered_once("config", "interpret")
def swiglu_backward_fused(dy, w_down, gu, *, config: BackwardConfig = BackwardConfig(), interpret=None):
    """(dgu [N, 2, f], h [N, f]) in ``dy``'s dtype for ``dy`` [N, d], ``w_down`` [f, d] and the saved
    pre-activation ``gu`` [N, 2, f]: ``dgu`` is the gradient of ``silu(gate) * up`` at ``dh = dy W_down^T``."""
    m, k = dy.shape
    f = w_down.shape[0]
    if not supported(m, k, f, config):
        raise ValueError(f"mlp/mosaic_gpu_bwd: shape N={m}, d={k}, f={f} does not tile with {config}")
    out_type = (jax.ShapeDtypeStruct((m, 2 * f), dy.dtype), jax.ShapeDtypeStruct((m, f), dy.dtype))
    call = _mgpu_matmul.launch(_kernel, config, out_type, interpret)
    dgu, h = call(dy, w_down.T.astype(dy.dtype), gu.reshape(m, 2 * f).astype(dy.dtype))
    return dgu.reshape(m, 2, f), h
