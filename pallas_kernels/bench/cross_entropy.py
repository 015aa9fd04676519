"""Linear cross-entropy benchmark: time, TFLOP/s and planned peak temporary memory of each ``cross_entropy_sum``
impl (``reference`` and ``chunked``: their per-token losses, summed; ``single_pass``, with several row chunks).

Shapes: Llama-3.2-3B (d 3072) and 1B (d 2048) with the 128256-token vocabulary at 16k tokens. The loss is
``sum(g * loss)`` with ``g`` a loss mask (about 10% of tokens masked) over the count, z-loss weight 1e-4, bf16
inputs. FLOPs counted are the model's (forward 2*N*d*V, forward+backward 6*N*d*V) for every impl, so the chunked
one's recomputed projection shows up as a lower rate. "Forward" is the loss without gradients (evaluation).
``temp_mib`` is XLA's planned scratch for the jitted forward+backward
(``compile().memory_analysis().temp_size_in_bytes``); errors are relative L2 against the reference in float32
(HIGHEST precision) on upcast inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.bench.mlp import _device_name, rel_err, temp_bytes, time_ms

VOCAB = 128256
SHAPES = {  # name: (tokens, d_model, vocab)
    "3B-16k": (16384, 3072, VOCAB),
    "1B-16k": (16384, 2048, VOCAB),
}
Z = 1e-4


def run(args) -> list[dict]:
    from pallas_kernels.cross_entropy import chunked, reference, single_pass, sum_registry, summed

    quick = getattr(args, "quick", False)
    iters = 3 if quick else 7
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    rows = []
    for name, (n, d, v) in shapes.items():
        k = jax.random.split(jax.random.key(1), 4)
        x = jax.random.normal(k[0], (n, d), jnp.bfloat16)
        w = (jax.random.normal(k[1], (d, v), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
        t = jax.random.randint(k[2], (n,), 0, v)
        mask = (jax.random.uniform(k[3], (n,)) > 0.1).astype(jnp.float32)
        g = mask / jnp.sum(mask)
        flops_fwd = 2.0 * n * d * v

        def make(fn):
            def loss(x, w):
                return fn(x, w, t, g, z_loss_weight=Z)
            return jax.jit(loss), jax.jit(jax.value_and_grad(loss, (0, 1)))

        with jax.default_matmul_precision("highest"):
            _, ref_fb = make(summed(reference.cross_entropy))
            ref = jax.block_until_ready(ref_fb(x.astype(jnp.float32), w.astype(jnp.float32)))
        ref = jax.tree.map(np.asarray, ref)
        impls = [(i, sum_registry.resolve(i)[1]) for i in sorted(sum_registry.names(), key=lambda s: s != "reference")]
        impls.append(("chunked[4008]", summed(lambda *a, **kw: chunked.cross_entropy(*a, vocab_chunk=4008, **kw))))
        for chunk in (1024, 4096):
            impls.append((f"single_pass[{chunk}]",
                          lambda *a, chunk=chunk, **kw: single_pass.cross_entropy_sum(*a, row_chunk=chunk, **kw)))
        ref_temp = None
        for impl, fn in impls:
            fwd, fb = make(fn)
            t_f = time_ms(fwd, x, w, iters=iters)
            t_fb = time_ms(fb, x, w, iters=iters)
            val, (dx, dw) = fb(x, w)
            tb = temp_bytes(lambda x, w: fb(x, w), x, w)
            if impl == "reference":
                ref_temp = tb
            rows.append(dict(
                kernel="cross_entropy", shape=name, impl=impl,
                fwd_ms=round(t_f, 2), fwd_tflops=round(flops_fwd / t_f / 1e9, 1),
                fwdbwd_ms=round(t_fb, 2), fwdbwd_tflops=round(3 * flops_fwd / t_fb / 1e9, 1),
                temp_mib=round(tb / 2**20, 1),
                temp_pct_of_ref=round(100 * tb / ref_temp, 1) if ref_temp else None,
                err_loss=f"{rel_err(val, ref[0]):.1e}", err_dx=f"{rel_err(dx, ref[1][0]):.1e}",
                err_dw=f"{rel_err(dw, ref[1][1]):.1e}", device=_device_name(),
            ))
            print(rows[-1], flush=True)
        del ref
    return rows
