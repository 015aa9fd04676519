"""The MLP gate/up kernel's CTA layouts against cuBLAS and jax's own Hopper matmul example, at one shape.

    python3 -m pallas_kernels.bench.mlp_layouts [--tokens 24576 --d-model 3072 --d-ff 8192]

Times (median of 20 calls, ``time_ms``) the plain [N, d] x [d, 2f] matmul with cuBLAS (``jnp.dot``), jax's
``hopper_matmul_mgpu`` in its warpgroup / cluster layouts (no epilogue), and our ``mosaic_gpu.swiglu_gate_up`` (the
same matmul plus the SwiGLU epilogue writing h, gate and up) in each of its layouts. A kernel that fails to compile
(shared memory, registers) is reported, not fatal. Hopper only.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.bench.mlp import time_ms

OURS = [  # SwiGLUConfig field changes from the default
    dict(wg_dimension="m", cluster_m=False, max_concurrent_steps=3, epi_slots=3),  # the layout until adc9043
    {},
    dict(max_concurrent_steps=3, epi_slots=3),
    dict(cluster_m=False),
    dict(wg_dimension="m"),
]


def _report(name, fn, args, flops):
    try:
        t = time_ms(jax.jit(fn), *args, iters=20, warmup=3)
        print(f"{name:78s} {t:7.3f} ms {flops / t / 1e9:6.1f} TFLOP/s", flush=True)
    except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
        print(f"{name:78s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m pallas_kernels.bench.mlp_layouts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--d-model", type=int, default=3072)
    parser.add_argument("--d-ff", type=int, default=8192)
    args = parser.parse_args(argv)
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    from pallas_kernels.mlp import mosaic_gpu

    n, d, f = args.tokens, args.d_model, args.d_ff
    x = jax.random.normal(jax.random.key(0), (n, d), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (d, 2, f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
    w2 = w.reshape(d, 2 * f)
    flops = 2 * n * d * 2 * f
    print(f"# {jax.devices()[0].device_kind}: [{n}, {d}] x [{d}, {2 * f}] bf16")
    _report("cuBLAS jnp.dot", lambda x, w2: jnp.dot(x, w2, preferred_element_type=jnp.bfloat16), (x, w2), flops)
    dim = hm.MatmulDimension
    for wg, cluster in [(dim.M, None), (dim.M, dim.M), (dim.N, None), (dim.N, dim.M), (dim.N, dim.N)]:
        cfg = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, grid_minor_dim=dim.N,
                              grid_tile_width=8, wg_dimension=wg, cluster_dimension=cluster)
        _report(f"jax example: warpgroups along {wg}, cluster {cluster}",
                lambda x, w2, cfg=cfg: hm.matmul(x, w2, None, cfg), (x, w2), flops)
    for change in OURS:
        cfg = dataclasses.replace(mosaic_gpu.SwiGLUConfig(), **change)
        _report(f"ours (+ SwiGLU epilogue) {change or 'default'}",
                lambda x, w, cfg=cfg: mosaic_gpu.swiglu_gate_up(x, w, config=cfg)[0], (x, w), flops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
