"""Seconds a fresh process takes to lower its first Triton kernel: ``python -m pallas_kernels.bench.triton_lowering``.

Lowers (and then compiles and runs) the Triton RMSNorm forward and backward at [4096, 3072] bf16 and prints the
time of each phase and whether torch got imported. ``--as-before`` skips ``_triton.specialize_without_torch``, as
the code was before it (Triton 3.6's specializer then imports torch where it is installed); ``--block-torch`` makes
torch unimportable for the whole process. Needs a GPU with jax-triton.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench.triton_lowering", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--as-before", action="store_true", help="without specialize_without_torch")
    parser.add_argument("--block-torch", action="store_true", help="torch unimportable for the whole process")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.block_torch:
        sys.modules["torch"] = None
    import jax
    import jax.numpy as jnp

    from pallas_kernels import _triton
    from pallas_kernels.rms_norm import rms_norm_and_skip

    if not _triton.available():
        print("error: needs a GPU with jax-triton installed", file=sys.stderr)
        return 2
    if args.as_before:
        _triton.specialize_without_torch = lambda: None
    x, scale = jnp.ones((4096, 3072), jnp.bfloat16), jnp.ones((3072,), jnp.float32)

    def loss(x, scale):
        return rms_norm_and_skip(x, scale, impl="triton")[0].astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    imported = time.perf_counter()
    lowered = step.lower(x, scale)
    lowered_at = time.perf_counter()
    jax.block_until_ready(lowered.compile()(x, scale))
    done = time.perf_counter()
    torch_loaded = sys.modules.get("torch") is not None
    print(f"imports {imported - start:.1f} s, lowering {lowered_at - imported:.1f} s, compile and run "
          f"{done - lowered_at:.1f} s; torch imported: {torch_loaded}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
