"""The parts the MLP's two Mosaic GPU kernels share: a persistent, warp-specialized Hopper matmul pipeline (one TMA
warpgroup, two wgmma warpgroups on half of the CTA's rows each; from jax's ``hopper_matmul_mgpu.py``, Apache 2.0,
The JAX Authors), the SMEM tile transforms, and the launch. Each kernel brings its own epilogue."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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


def pipeline(body, compute_context, *, dtype, cta_tile_m: int, tile_n: int, tile_k: int, k_iters: int,
             max_concurrent_steps: int):
    """The pipeline over the contraction: A blocks [cta_tile_m, tile_k], B blocks [tile_k, tile_n] into SMEM."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    transforms = tile_transforms(dtype, tile_k)
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_tile_m, tile_k), lambda kk: (0, kk), transforms=transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((tile_k, tile_n), lambda kk: (kk, 0), transforms=transforms, memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=max_concurrent_steps,
        compute_context=compute_context,
    )


def launch(kernel, config, out_type, interpret=None):
    """The kernel as a persistent grid of one CTA per SM with three warpgroups (warpgroup lowering semantics)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.kernel(
        functools.partial(kernel, config=config),
        out_type=out_type,
        grid=(num_sms(),),
        grid_names=("cluster_grid",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret is not None else {}),
    )
