"""The parts the MLP's two Mosaic GPU kernels share: a persistent, warp-specialized Hopper matmul pipeline (one TMA
warpgroup, two wgmma warpgroups; from jax's ``hopper_matmul_mgpu.py``, Apache 2.0, The JAX Authors), the SMEM tile
transforms, and the launch. Each kernel brings its own epilogue.

A CTA's two compute warpgroups split its tile along M (each ``tile_m`` rows of a ``2 * tile_m`` x ``tile_n`` tile)
or along N (each ``tile_n`` columns of ``tile_m`` x ``2 * tile_n``). With ``cluster_m`` two CTAs of a cluster
compute vertically adjacent tiles and receive each weight block once, multicast by TMA to both."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

WG_M, WG_N = "m", "n"


def num_sms() -> int:
    try:
        return jax.devices()[0].core_count
    except Exception:  # noqa: BLE001 - CPU devices in interpret mode
        return 4


def tile_transforms(dtype, cols: int) -> tuple:
    """Tiling + the widest swizzle for an SMEM tile ``cols`` elements wide."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def cta_tile(tile_m: int, tile_n: int, wg_dimension: str) -> tuple[int, int]:
    """The CTA's tile: the two warpgroups' ``tile_m`` x ``tile_n`` accumulators side by side along ``wg_dimension``."""
    if wg_dimension not in (WG_M, WG_N):
        raise ValueError(f"wg_dimension must be {WG_M!r} or {WG_N!r}, got {wg_dimension!r}")
    return (2 * tile_m, tile_n) if wg_dimension == WG_M else (tile_m, 2 * tile_n)


def warpgroup_slices(wg_idx, tile_m: int, tile_n: int, wg_dimension: str):
    """(rows, cols) of the CTA tile that warpgroup ``wg_idx`` accumulates."""
    import jax.experimental.pallas as pl

    if wg_dimension == WG_M:
        return pl.ds(wg_idx * tile_m, tile_m), slice(None)
    return slice(None), pl.ds(wg_idx * tile_n, tile_n)


def pipeline(body, compute_context, *, dtype, cta_tile_m: int, cta_tile_n: int, tile_k: int, k_iters: int,
             max_concurrent_steps: int, cluster_m: bool = False):
    """The pipeline over the contraction: A blocks [cta_tile_m, tile_k], B blocks [tile_k, cta_tile_n] into SMEM; with
    ``cluster_m`` the B blocks are shared by the cluster's two CTAs."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    transforms = tile_transforms(dtype, tile_k)
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_tile_m, tile_k), lambda kk: (0, kk), transforms=transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((tile_k, cta_tile_n), lambda kk: (kk, 0), transforms=transforms, memory_space=plgpu.SMEM,
                            collective_axes=("cluster",) if cluster_m else ()),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=max_concurrent_steps,
        compute_context=compute_context,
    )


def launch(kernel, config, out_type, interpret=None, cluster_m: bool = False):
    """The kernel as a persistent grid of one CTA per SM (in clusters of two with ``cluster_m``) with three
    warpgroups (warpgroup lowering semantics)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cluster = 2 if cluster_m else 1
    return plgpu.kernel(
        functools.partial(kernel, config=config),
        out_type=out_type,
        grid=(num_sms() // cluster,),
        grid_names=("cluster_grid",),
        cluster=(cluster,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret is not None else {}),
    )
