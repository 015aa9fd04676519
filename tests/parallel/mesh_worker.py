"""Run in a subprocess with 8 host devices: loss and gradients on each mesh vs the 1-device run.

``python tests/parallel/mesh_worker.py 8x1x1x1 2x4x1x1 ...`` prints one JSON line per mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from litespark_jax.config import Config, MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from litespark_jax.parallel import kernels  # noqa: E402
from litespark_jax.parallel.logical import use_rules  # noqa: E402
from litespark_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, build_mesh, check_shapes  # noqa: E402
from litespark_jax.parallel.sharding import param_shardings  # noqa: E402
from litespark_jax.train.state import abstract_model, init_model  # noqa: E402
from litespark_jax.train.step import token_loss_sum  # noqa: E402

MODEL = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, d_ff=128,
                    max_seq_len=64, dtype="float32", remat_policy="full", attention_impl="reference",
                    mlp_impl="reference", cross_entropy_impl="reference", rms_norm_impl="reference")
BATCH, SEQ = 8, 32


def make_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, MODEL.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int32)
    segment_ids = np.where(np.arange(SEQ) < SEQ // 2 + 3, 1, 2).astype(np.int32)[None].repeat(BATCH, 0)
    segment_ids[-1, -4:] = 0  # padding at the end of one row
    positions = np.concatenate([np.arange(SEQ // 2 + 3), np.arange(SEQ - SEQ // 2 - 3)]).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions[None].repeat(BATCH, 0),
            "segment_ids": segment_ids, "loss_mask": (segment_ids > 0).astype(np.float32)}


def loss_and_grads(graphdef, params, batch):
    def f(p, b):
        return token_loss_sum(p, graphdef, b, z_loss_weight=1e-4, impl="reference")

    (loss_sum, count), grads = jax.value_and_grad(f, has_aux=True)(params, batch)
    return loss_sum / count, jax.tree.map(lambda g: g / count, grads)


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def row_kernel_check():
    """A function of a mesh giving the largest error (outputs and all gradients) of the row-kernel wrappers
    (``kernels.rms_norm_and_skip`` with the Triton kernels in Triton's interpreter, ``kernels.mlp`` with ``fused``,
    ``kernels.cross_entropy_sum`` with ``single_pass``) on that mesh against the plain calls, which do not depend on
    the mesh and so run once."""
    import pallas_kernels
    from pallas_kernels.rms_norm import _NORM_AND_SKIP, registry, triton_kernel

    name = "triton_interpret"
    if name not in registry.names():
        registry.register(name)(lambda x, s, eps: triton_kernel.rms_norm(x, s, eps=eps, interpret=True))
        _NORM_AND_SKIP[name] = lambda x, s, eps: triton_kernel.rms_norm_and_skip(x, s, eps=eps, interpret=True)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(BATCH, SEQ, MODEL.d_model)), jnp.float32)
    scale = jnp.asarray(1 + 0.1 * rng.normal(size=MODEL.d_model), jnp.float32)
    wgu = jnp.asarray(rng.normal(size=(MODEL.d_model, 2, MODEL.d_ff)) / 8, jnp.float32)
    wd = jnp.asarray(rng.normal(size=(MODEL.d_ff, MODEL.d_model)) / 11, jnp.float32)

    def norm_loss(fn):
        def loss(x, s):
            y, skip = fn(x, s, eps=1e-5, impl=name)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(skip) * y)
        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    def mlp_loss(fn):
        return jax.jit(jax.value_and_grad(lambda x, a, b: jnp.sum(jnp.sin(fn(x, a, b, impl="fused"))), (0, 1, 2)))

    w_out = jnp.asarray(rng.normal(size=(MODEL.d_model, MODEL.vocab_size)) / 8, jnp.float32)
    targets = jnp.asarray(rng.integers(0, MODEL.vocab_size, size=(BATCH, SEQ)), jnp.int32)
    mask = jnp.asarray(rng.random((BATCH, SEQ)) > 0.2, jnp.float32)

    def ce_loss(fn):
        # single_pass with 16-row chunks (several per device on every mesh); the tensor meshes get chunked.
        return jax.jit(jax.value_and_grad(
            lambda x, w, m: fn(x, w, targets, m, z_loss_weight=1e-4, impl="single_pass"), (0, 1, 2)))

    plain = (norm_loss(pallas_kernels.rms_norm_and_skip)(x, scale), mlp_loss(pallas_kernels.mlp)(x, wgu, wd),
             ce_loss(pallas_kernels.cross_entropy_sum)(x, w_out, mask))
    err = lambda a, b: max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-12))  # noqa: E731
                           for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def errors(mesh):
        with use_rules(mesh, DEFAULT_RULES):
            wrapped = (norm_loss(kernels.rms_norm_and_skip)(x, scale), mlp_loss(kernels.mlp)(x, wgu, wd),
                       ce_loss(kernels.cross_entropy_sum)(x, w_out, mask))
        return err(wrapped[0], plain[0]), err(wrapped[1], plain[1]), err(wrapped[2], plain[2])

    return errors


def main(shapes):
    from pallas_kernels.cross_entropy import single_pass

    single_pass._CHUNK_BYTES = 4 * MODEL.vocab_size * 16  # 16-row chunks: the chunk loop runs several times
    graphdef, params = init_model(MODEL, seed=0)
    batch = make_batch()
    ref_loss, ref_grads = jax.jit(lambda p, b: loss_and_grads(graphdef, p, b))(params, batch)
    ref_grads = flat(ref_grads)
    total_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    _, abstract = abstract_model(MODEL)
    row_kernel_errors = row_kernel_check()
    for shape in shapes:
        d, f, t, c = (int(x) for x in shape.split("x"))
        config = Config(model=MODEL, train=TrainConfig(global_batch_size=BATCH, seq_len=SEQ),
                        mesh=MeshConfig(data=d, fsdp=f, tensor=t, context=c))
        mesh = build_mesh(config.mesh)
        check_shapes(config, mesh)
        p_sharding = param_shardings(abstract, mesh)
        b_sharding = batch_sharding(mesh)
        sharded_params = jax.device_put(params, p_sharding)
        sharded_batch = jax.device_put(batch, b_sharding)
        with use_rules(mesh, DEFAULT_RULES):
            step = jax.jit(lambda p, b: loss_and_grads(graphdef, p, b), in_shardings=(p_sharding, b_sharding),
                           out_shardings=(None, p_sharding))
            loss, grads = step(sharded_params, sharded_batch)
        # Bytes of parameters held by the first device.
        device0 = mesh.devices.flat[0]
        per_device = sum(s.data.nbytes for x in jax.tree.leaves(sharded_params) for s in x.addressable_shards
                         if s.device == device0)
        grad_per_device = sum(s.data.nbytes for x in jax.tree.leaves(grads) for s in x.addressable_shards
                              if s.device == device0)
        grads = flat(grads)
        max_grad_err = max(float(np.max(np.abs(grads[k] - ref_grads[k])) / (np.max(np.abs(ref_grads[k])) + 1e-12))
                           for k in ref_grads)
        # The shard_map (Ulysses) attention wrapper against the plain kernel on this mesh.
        rng = np.random.default_rng(1)
        q = jnp.asarray(rng.normal(size=(BATCH, SEQ, MODEL.num_heads, 16)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(BATCH, SEQ, MODEL.num_kv_heads, 16)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(BATCH, SEQ, MODEL.num_kv_heads, 16)), jnp.float32)
        seg = jnp.asarray(batch["segment_ids"])
        import pallas_kernels

        plain = pallas_kernels.attention(q, k, v, segment_ids=seg, causal=True, impl="reference")
        with use_rules(mesh, DEFAULT_RULES):
            wrapped = jax.jit(lambda q, k, v, s: kernels.attention(q, k, v, segment_ids=s, causal=True,
                                                                   impl="reference"))(q, k, v, seg)
        norm_err, mlp_err, ce_err = row_kernel_errors(mesh)
        print(json.dumps({
            "mesh": shape, "loss": float(loss), "ref_loss": float(ref_loss), "max_grad_rel_err": max_grad_err,
            "param_bytes_per_device": per_device, "grad_bytes_per_device": grad_per_device,
            "param_bytes_total": total_bytes,
            "attention_wrapper_err": float(jnp.max(jnp.abs(wrapped - plain))),
            "norm_wrapper_err": norm_err, "mlp_wrapper_err": mlp_err, "loss_wrapper_err": ce_err,
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
