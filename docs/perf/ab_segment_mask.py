"""A/B of two versions of the attention kernel file on segment-id layouts (run 14 in attention.md).

    git show fa209ec:pallas_kernels/attention/mosaic_gpu.py > /tmp/mosaic_gpu_old.py
    python docs/perf/ab_segment_mask.py /tmp/mosaic_gpu_old.py

Times, in one process and alternating, that file's kernels ("old") and the working tree's ("new"), streamed forward
and forward+backward, at the 3B and S8192 shapes with no segment ids, one document per row, two per row and packed
short documents; first prints how far apart their outputs and gradients are.
"""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import mosaic_gpu as mosaic_gpu_new
from pallas_kernels.bench.attention import _docs, make_inputs
from pallas_kernels.bench.mlp import stream_ms


def load_module(path):
    spec = importlib.util.spec_from_file_location("mosaic_gpu_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_docs(b, s, seed=1):
    rng = np.random.default_rng(seed)
    out = np.ones((b, s), np.int32)
    for i in range(b):
        out[i, int(rng.integers(s // 4, 3 * s // 4)):] = 2
    return jnp.asarray(out)


def jitted(module):
    def attn(q, k, v, seg):
        return module.attention(q, k, v, segment_ids=seg, causal=True)

    def fwd_bwd(q, k, v, seg, do):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return out, vjp(do)

    return jax.jit(attn), jax.jit(fwd_bwd)


def main(old_path):
    modules = {"old": load_module(old_path), "new": mosaic_gpu_new}
    for name, b, s, h, kvh in [("3b-s4k", 4, 4096, 24, 8), ("8b-s8k", 2, 8192, 32, 8)]:
        q, k, v, _, do = make_inputs(b, s, h, kvh, 128, None)
        segs = {"none": None, "one-doc": jnp.ones((b, s), jnp.int32), "two-docs": two_docs(b, s),
                "docs": _docs(b, s)}
        fns = {tag: jitted(module) for tag, module in modules.items()}
        for key, seg in segs.items():
            o1, g1 = fns["old"][1](q, k, v, seg, do)
            o2, g2 = fns["new"][1](q, k, v, seg, do)
            errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))
                    for a, c in zip([o1, *g1], [o2, *g2])]
            print(name, key, "max |old - new| out,dq,dk,dv:", ["%.2e" % e for e in errs], flush=True)
        for rep in range(3):
            for tag in ("old", "new"):
                fwd, fwd_bwd = fns[tag]
                row = []
                for key, seg in segs.items():
                    f = stream_ms(fwd, q, k, v, seg, calls=20)
                    t = stream_ms(fwd_bwd, q, k, v, seg, do, calls=20)
                    row.append(f"{key}: {f:.3f} / {t:.3f}")
                print(name, rep, tag, "fwd / fwdbwd ms |", " | ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
