"""Planner memory vs XLA's compiled memory analysis on 8 CPU host devices; one JSON line per (config, mesh).

    python tests/parallel/plan_worker.py [NAME ...]
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from litespark_jax import plan  # noqa: E402
from litespark_jax.config import load_config  # noqa: E402
from litespark_jax.parallel.mesh import inter_node_shape  # noqa: E402
from litespark_jax.config import MeshConfig  # noqa: E402

SMALL = ["model.d_model=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4", "model.d_ff=1536",
         "model.vocab_size=8192", "train.seq_len=512", "train.global_batch_size=16"]
CASES = {
    "tiny-none": ("configs/tiny.yaml", [], ["8x1x1x1", "1x8x1x1", "2x2x2x1"]),
    # tiny has 6 heads since 53dcd50 (not divisible by tensor x context = 4): the context case is 1x4x1x2
    "tiny-full": ("configs/tiny.yaml", ["model.remat_policy=full"], ["1x8x1x1", "1x4x2x1", "1x4x1x2"]),
    "small-full-bf16": (None, SMALL + ["model.remat_policy=full", "model.dtype=bfloat16"],
                        ["1x8x1x1", "2x4x1x1", "1x4x2x1"]),
    "small-none": (None, SMALL + ["model.remat_policy=none"], ["1x8x1x1", "1x2x4x1"]),
    "small-save_matmuls": (None, SMALL + ["model.remat_policy=save_matmuls"], ["1x8x1x1"]),
    # The 1B preset's layer scan (its unrolled, cast-once default is scheduled differently by XLA's CPU backend
    # than on a GPU; its GPU footprint is measured in docs/PERFORMANCE.md).
    "1b-full": ("configs/llama-3.2-1b.yaml", ["train.seq_len=1024", "train.global_batch_size=8",
                                              "model.scan_layers=true", "model.cast_weights_once=false"], ["1x8x1x1"]),
}


def main(names):
    for name in names or CASES:
        path, overrides, meshes = CASES[name]
        config = load_config(path, overrides)
        n = 8
        ce = plan._resolved_ce(config.model, config.train, n)
        for mesh in meshes:
            sizes = dict(zip(("data", "fsdp", "tensor", "context"), (int(x) for x in mesh.split("x"))))
            inter = inter_node_shape(MeshConfig(**sizes), sizes, 1)
            p = plan.plan_mesh(config.model, config.train, plan.GPUS["h100"], sizes, inter,
                               config.train.grad_accum_steps, attention="reference", cross_entropy=ce,
                               mlp="reference" if config.model.mlp_impl == "reference" else "fused")
            xla = plan.xla_memory(config, sizes)
            print(json.dumps({"case": name, "mesh": mesh, "predicted": p.total_bytes, "xla": xla["total"],
                              "error": (p.total_bytes - xla["total"]) / xla["total"], "xla_detail": xla,
                              "components": p.memory}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
