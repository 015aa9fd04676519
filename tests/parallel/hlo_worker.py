"""FSDP gathers one layer at a time: compile a gradient step on 1x8 (fsdp) and count all-gathers in the scan
bodies of the optimized HLO; and the gradient collectives of the row kernels (norm, MLP) in ``shard_map`` against
leaving them to XLA's partitioner. Prints one JSON line."""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import re, jax, numpy as np
from litespark_jax.config import ModelConfig
from litespark_jax.parallel.logical import use_rules
from litespark_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, build_mesh
from litespark_jax.config import MeshConfig
from litespark_jax.parallel.sharding import param_shardings
from litespark_jax.train.state import abstract_model
from litespark_jax.train.step import token_loss_sum
cfg = ModelConfig(vocab_size=256, d_model=64, num_layers=4, num_heads=8, num_kv_heads=4, d_ff=128, remat_policy="full")
mesh = build_mesh(MeshConfig(data=1, fsdp=8))
graphdef, abstract = abstract_model(cfg)
ps = param_shardings(abstract, mesh)
bs = batch_sharding(mesh)
batch = {k: jax.ShapeDtypeStruct((8, 32), "int32") for k in ("inputs", "targets", "positions", "segment_ids")}
batch["loss_mask"] = jax.ShapeDtypeStruct((8, 32), "float32")
f = lambda p, b: jax.grad(lambda p: token_loss_sum(p, graphdef, b, z_loss_weight=0.0, impl="reference")[0])(p)
with use_rules(mesh, DEFAULT_RULES):
    hlo = jax.jit(f, in_shardings=(ps, bs), out_shardings=ps).lower(abstract, batch).compile().as_text()
# Computations that are while bodies, and the all-gathers in them.
bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
comps = re.split(r"\n(?=\S)", hlo)
inside = sum(c.count("all-gather") for c in comps if any(c.startswith(("%" + b, b)) or (" " + b + " ") in c.split("\n")[0] for b in bodies))
total = hlo.count("all-gather")

import dataclasses

from litespark_jax.parallel import kernels


def collectives(row_kernels_per_device: bool) -> dict:
    """Counts of gradient collectives in an unrolled step (one per layer is visible)."""
    graphdef, abstract = abstract_model(dataclasses.replace(cfg, scan_layers=False))
    ps = param_shardings(abstract, mesh)
    f = lambda p, b: jax.grad(lambda p: token_loss_sum(p, graphdef, b, z_loss_weight=0.0, impl="reference")[0])(p)
    original = kernels._row_axes
    if not row_kernels_per_device:
        kernels._row_axes = lambda *a: None
    try:
        with use_rules(mesh, DEFAULT_RULES):
            text = jax.jit(f, in_shardings=(ps, bs), out_shardings=ps).lower(abstract, batch).compile().as_text()
    finally:
        kernels._row_axes = original
    return {op: len(re.findall(op + r"(-start)?\(", text)) for op in ("all-reduce", "reduce-scatter")}


import json
print(json.dumps({"loop_bodies": len(bodies), "all_gather_total": total, "all_gather_in_loops": inside,
                  "layers": cfg.num_layers, "row_kernels_in_shard_map": collectives(True),
                  "row_kernels_to_xla": collectives(False)}))
