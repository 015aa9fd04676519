"""RMSNorm benchmark: GB/s forward and forward+backward of each ``rms_norm`` impl on [16k, d] bf16.

Bytes counted are the fewest that must move: forward reads x and writes y (2*N*d*2); forward+backward adds reading
x and dy and writing dx (5*N*d*2 in all; the scale vector is negligible). ``skip_ms`` times forward+backward of
``rms_norm_and_skip`` (a pre-norm block's norm and residual read of ``x``, with a cotangent for each): the sum of the
two gradients of ``x`` included, 6*N*d*2 bytes at the least.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.bench.mlp import _device_name, rel_err, temp_bytes, time_ms

SHAPES = {"3B-16k": (16384, 3072), "1B-16k": (16384, 2048)}


def run(args) -> list[dict]:
    from pallas_kernels.rms_norm import reference, registry, rms_norm_and_skip

    quick = getattr(args, "quick", False)
    iters = 10 if quick else 30
    rows = []
    for name, (n, d) in SHAPES.items():
        k = jax.random.split(jax.random.key(2), 3)
        x = jax.random.normal(k[0], (n, d), jnp.bfloat16)
        scale = (1.0 + 0.1 * jax.random.normal(k[1], (d,))).astype(jnp.bfloat16)
        dy = jax.random.normal(k[2], (n, d), jnp.bfloat16)

        def fwdbwd(fn):
            def g(x, scale, dy):
                y, vjp = jax.vjp(fn, x, scale)
                return (y, *vjp(dy))
            return jax.jit(g)

        ref = fwdbwd(reference.rms_norm)(x.astype(jnp.float32), scale.astype(jnp.float32), dy.astype(jnp.float32))
        dskip = jax.random.normal(jax.random.key(3), (n, d), jnp.bfloat16)

        def skip_fwdbwd(impl):
            def g(x, scale, dy, dskip):
                out, vjp = jax.vjp(lambda x, s: rms_norm_and_skip(x, s, impl=impl), x, scale)
                return (*out, *vjp((dy, dskip)))
            return jax.jit(g)

        ref_skip = skip_fwdbwd("reference")(*(a.astype(jnp.float32) for a in (x, scale, dy, dskip)))
        for impl in sorted(registry.names(), key=lambda s: s != "reference"):
            if not registry.available(impl):
                continue
            fn = registry.resolve(impl)[1]
            fwd = jax.jit(fn)
            fb = fwdbwd(fn)
            t_f = time_ms(fwd, x, scale, iters=iters)
            t_fb = time_ms(fb, x, scale, dy, iters=iters)
            skip = skip_fwdbwd(impl)
            t_skip = time_ms(skip, x, scale, dy, dskip, iters=iters)
            skip_dx = skip(x, scale, dy, dskip)[2]
            y, dx, ds = fb(x, scale, dy)
            rows.append(dict(
                kernel="rms_norm", shape=name, impl=impl,
                fwd_ms=round(t_f, 3), fwd_gbs=round(2 * n * d * 2 / t_f / 1e6, 0),
                fwdbwd_ms=round(t_fb, 3), fwdbwd_gbs=round(5 * n * d * 2 / t_fb / 1e6, 0),
                skip_ms=round(t_skip, 3), skip_gbs=round(6 * n * d * 2 / t_skip / 1e6, 0),
                err_skip_dx=f"{rel_err(skip_dx, ref_skip[2]):.1e}",
                temp_mib=round(temp_bytes(fb, x, scale, dy) / 2**20, 1),
                err_y=f"{rel_err(y, ref[0]):.1e}", err_dx=f"{rel_err(dx, ref[1]):.1e}",
                err_dscale=f"{rel_err(ds, ref[2]):.1e}", device=_device_name(),
            ))
            print(rows[-1], flush=True)
    return rows
