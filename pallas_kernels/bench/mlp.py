"""SwiGLU MLP benchmark: forward and forward+backward TFLOP/s of each ``mlp`` impl, next to a plain bf16 matmul.

Shapes: Llama-3.2-3B (d 3072, ffn 8192) and 1B (d 2048, ffn 8192) at 16k tokens (batch 4 x seq 4096). FLOPs counted:
forward 6*N*d*f (gate_up 4Ndf, down 2Ndf), forward+backward 3x that. ``matmul`` is one [N, d] x [d, 2f] bf16 matmul
timed in the same run: the rate the MLP is measured against. The error is the relative L2 error against the
reference evaluated in float32 (HIGHEST precision) on upcast inputs.

The timing helpers here are shared by the other benchmark modules of this package.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # name: (tokens, d_model, d_ff)
    "3B-16k": (16384, 3072, 8192),
    "1B-16k": (16384, 2048, 8192),
}


def time_ms(fn, *args, iters: int = 10, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of ``fn(*args)`` (synchronized), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stream_ms(fn, *args, calls: int = 10, warmup: int = 2) -> float:
    """Milliseconds per call of ``fn(*args)`` dispatched back to back: (time of 2 x ``calls`` calls - time of
    ``calls`` calls) / ``calls``, each batch synchronized once.

    ``time_ms`` waits for every call, so each of its times also holds the host's dispatch and the sync (~0.2-0.75
    ms for an attention fwd+bwd on an H100, more for cuDNN's); here the host enqueues the next call while the device
    runs the last one, as in a training step, and the difference of two batches cancels what a batch pays once (the
    first call's dispatch before the device starts, the final sync), leaving the device's time per call whenever a
    call outlasts its dispatch."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))

    def batch(n):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)  # one device stream runs the calls in order: the last one done means all are
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    once = batch(calls)
    return (batch(2 * calls) - once) * 1e3 / calls


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def temp_bytes(fn, *args) -> int:
    """Temporary (scratch) bytes XLA plans for ``jax.jit(fn)(*args)``."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", -1)) if stats is not None else -1


def mlp_matmuls(x, w_gate_up, w_down, dy, h, dgu):
    """The six matmuls of a SwiGLU MLP's forward and backward with nothing else: the forward's [N, d] x [d, 2f] and
    [N, f] x [f, d], the backward's dh = dy W_down^T, dW_down = h^T dy, dx = dgu W_gate_up^T and dW_gate_up = x^T dgu.
    ``h`` [N, f] and ``dgu`` [N, 2f] are given, so no elementwise work runs: the same 18 N d f FLOPs as the MLP at
    the rate cuBLAS reaches on exactly these shapes and transposes (the ceiling of any fused MLP)."""
    d, two, f = w_gate_up.shape
    w = w_gate_up.reshape(d, two * f)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    outs = (dot(x, w), dot(h, w_down), dot(dy, w_down.T), dot(h.T, dy), dot(dgu, w.T), dot(x.T, dgu))
    return tuple(o.astype(x.dtype) for o in outs)


def _device_name() -> str:
    return jax.devices()[0].device_kind


def run(args) -> list[dict]:
    from pallas_kernels.mlp import fused, reference, registry

    quick = getattr(args, "quick", False)
    iters = 5 if quick else 10
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    rows = []
    for name, (n, d, f) in shapes.items():
        k = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(k[0], (n, d), jnp.bfloat16)
        wgu = (jax.random.normal(k[1], (d, 2, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
        wd = (jax.random.normal(k[2], (f, d), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
        dy = jax.random.normal(k[3], (n, d), jnp.bfloat16)
        flops_fwd = 6.0 * n * d * f

        mm = jax.jit(lambda a, b: jnp.dot(a, b))  # bf16 x bf16 -> bf16, float32 accumulation
        wflat = wgu.reshape(d, 2 * f)
        ms = time_ms(mm, x, wflat, iters=iters)
        mm_rate = 2.0 * n * d * 2 * f / ms / 1e9
        rows.append(dict(kernel="mlp", shape=name, impl="matmul[N,d]x[d,2f]", fwd_ms=round(ms, 3),
                         fwd_tflops=round(mm_rate, 1), device=_device_name()))
        h = jax.random.normal(k[0], (n, f), jnp.bfloat16)
        dgu = jax.random.normal(k[1], (n, 2 * f), jnp.bfloat16)
        ms_six = time_ms(jax.jit(mlp_matmuls), x, wgu, wd, dy, h, dgu, iters=iters)
        six_rate = 3 * flops_fwd / ms_six / 1e9
        rows.append(dict(kernel="mlp", shape=name, impl="six matmuls only (fwd+bwd shapes)", fwdbwd_ms=round(ms_six, 3),
                         fwdbwd_tflops=round(six_rate, 1),
                         fwdbwd_pct_of_matmul=round(100 * six_rate / mm_rate, 1), device=_device_name()))
        if name == list(shapes)[0]:
            sq = jax.random.normal(k[3], (8192, 8192), jnp.bfloat16)
            ms_sq = time_ms(mm, sq, sq.T + 1, iters=iters)
            rows.append(dict(kernel="mlp", shape="8192^3", impl="matmul", fwd_ms=round(ms_sq, 3),
                             fwd_tflops=round(2 * 8192**3 / ms_sq / 1e9, 1), device=_device_name()))

        def loss_grad(fn):
            def g(x, wgu, wd, dy):
                out, vjp = jax.vjp(fn, x, wgu, wd)
                return (out, *vjp(dy))
            return jax.jit(g)

        f32 = lambda a: a.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
            ref = jax.block_until_ready(loss_grad(reference.mlp)(f32(x), f32(wgu), f32(wd), f32(dy)))
        impls = [(i, registry.resolve(i)[1]) for i in sorted(registry.names(), key=lambda s: s != "reference")
                 if registry.available(i)]
        impls.append(("fused[bf16-gate-up]", functools.partial(fused.mlp, gate_up_f32=False)))
        for impl, fn_ in impls:
            fn = lambda x, wgu, wd, fn_=fn_: fn_(x, wgu, wd)
            fwd = jax.jit(fn)
            fb = loss_grad(fn)
            try:
                t_f = time_ms(fwd, x, wgu, wd, iters=iters)
                t_fb = time_ms(fb, x, wgu, wd, dy, iters=iters)
                outs = fb(x, wgu, wd, dy)
            except Exception as e:  # noqa: BLE001 - report a kernel that fails to build and go on
                rows.append(dict(kernel="mlp", shape=name, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(rows[-1], flush=True)
                continue
            errs = [rel_err(a, b) for a, b in zip(outs, ref)]
            rows.append(dict(
                kernel="mlp", shape=name, impl=impl,
                fwd_ms=round(t_f, 3), fwd_tflops=round(flops_fwd / t_f / 1e9, 1),
                fwdbwd_ms=round(t_fb, 3), fwdbwd_tflops=round(3 * flops_fwd / t_fb / 1e9, 1),
                fwdbwd_pct_of_matmul=round(100 * 3 * flops_fwd / t_fb / 1e9 / mm_rate, 1),
                err_out=f"{errs[0]:.1e}", err_dx=f"{errs[1]:.1e}", err_dwgu=f"{errs[2]:.1e}", err_dwd=f"{errs[3]:.1e}",
                temp_mib=round(temp_bytes(fb, x, wgu, wd, dy) / 2**20, 1), device=_device_name(),
            ))
            print(rows[-1], flush=True)
        del ref
    return rows
