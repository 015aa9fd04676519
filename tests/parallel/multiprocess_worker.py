"""One process of a multi-process run (or a single process): train a tiny model on a mesh with synthetic batches,
checkpoint at a step, or resume from a checkpoint; process 0 writes losses and final parameters to an .npz.

    python launch/local.py --processes 2 --devices-per-process 4 -- python tests/parallel/multiprocess_worker.py \
        --out a.npz --steps 6 --save-at 3 --ckpt DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel/multiprocess_worker.py \
        --out b.npz --steps 6 --resume DIR/3
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from litespark_jax.parallel.distributed import initialize_from_env  # noqa: E402

initialize_from_env()
jax.config.update("jax_default_matmul_precision", "highest")

from litespark_jax.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from litespark_jax.parallel.logical import use_rules  # noqa: E402
from litespark_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, build_mesh, check_shapes  # noqa: E402
from litespark_jax.parallel.sharding import opt_state_shardings, param_shardings  # noqa: E402
from litespark_jax.train.optimizer import build_optimizer, learning_rate_schedule  # noqa: E402
from litespark_jax.train.state import TrainState, abstract_model, init_model  # noqa: E402
from litespark_jax.train.step import make_train_step  # noqa: E402

MODEL = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=32,
                    dtype="float32", remat_policy="full")
BATCH, SEQ = 8, 16


def global_batch(step: int) -> dict:
    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(1, MODEL.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "segment_ids": np.ones((BATCH, SEQ), np.int32), "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--mesh", default="2x-1x1x1")
    args = parser.parse_args()
    d, f, t, c = (int(x) for x in args.mesh.split("x"))
    config = Config(model=MODEL, train=TrainConfig(steps=args.steps, global_batch_size=BATCH, seq_len=SEQ),
                    optim=OptimConfig(warmup_steps=2, decay_steps=4, learning_rate=1e-2),
                    mesh=MeshConfig(data=d, fsdp=f, tensor=t, context=c))
    mesh = build_mesh(config.mesh)
    check_shapes(config, mesh)
    optimizer = build_optimizer(config.optim, args.steps)
    graphdef, abstract = abstract_model(MODEL)
    p_sharding = param_shardings(abstract, mesh)
    state_sharding = TrainState(step=NamedSharding(mesh, PartitionSpec()), params=p_sharding,
                                opt_state=opt_state_shardings(optimizer, abstract, p_sharding, mesh))
    b_sharding = batch_sharding(mesh)

    def init():
        _, params = init_model(MODEL, 0)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    with use_rules(mesh, DEFAULT_RULES):
        step_fn = jax.jit(make_train_step(config, graphdef, optimizer, learning_rate_schedule(config.optim,
                                                                                             args.steps)),
                          in_shardings=(state_sharding, b_sharding), out_shardings=(state_sharding, None),
                          donate_argnums=0)
        start = 0
        if args.resume:
            from litespark_jax.checkpoint.manager import CheckpointManager, abstract_with_shardings, \
                split_checkpoint_path

            root, step = split_checkpoint_path(args.resume)
            manager = CheckpointManager(root, read_only=True)
            shapes = jax.eval_shape(init)
            restored = manager.restore(abstract_with_shardings(shapes, state_sharding), step)
            manager.close()
            state, start = restored.state, restored.step
        else:
            state = jax.jit(init, out_shardings=state_sharding)()
        manager = None
        if args.ckpt:
            from litespark_jax.checkpoint.manager import CheckpointManager

            manager = CheckpointManager(args.ckpt)
        losses = {}
        for step in range(start + 1, args.steps + 1):
            batch = {k: jax.make_array_from_callback(v.shape, b_sharding, lambda idx, v=v: v[idx])
                     for k, v in global_batch(step).items()}
            state, metrics = step_fn(state, batch)
            losses[step] = float(np.asarray(metrics["loss"].addressable_data(0)))  # replicated scalar
            if manager is not None and step == args.save_at:
                manager.save(step, state, force=True)
                manager.wait()
        if manager is not None:
            manager.close()
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(args.out, losses=np.array([losses[s] for s in sorted(losses)]),
                 loss_steps=np.array(sorted(losses)), num_processes=jax.process_count(),
                 num_devices=jax.device_count(), **{"param" + k: v for k, v in flat.items()})
    print(f"process {jax.process_index()}/{jax.process_count()} done: {jax.device_count()} devices, "
          f"mesh {dict(mesh.shape)}, losses {losses}", flush=True)


if __name__ == "__main__":
    main()
