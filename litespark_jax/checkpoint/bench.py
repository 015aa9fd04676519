"""Checkpoint save benchmark: throughput of a save and the training stall an asynchronous save causes.

    python -m litespark_jax.checkpoint.bench --config configs/llama-3.2-3b.yaml [--dir /local/disk] [overrides]

It builds the run's Trainer (mesh, sharded state, jitted step) and trains on a fixed synthetic batch (so data loading
is not measured), then:

1. baseline: ``--steps`` training steps without saving -> median step time;
2. synchronous save of the whole TrainState (params + Adam moments + step) -> GB/s = state bytes / wall time;
3. asynchronous save issued after a step, training continuing meanwhile -> the time the ``save()`` call blocks
   (device-to-host copy + checksums), the extra time of the steps that overlap the background write
   (stall = sum(step times while saving) - count x baseline median), and the time until the save is finalized
   (-> async GB/s).

Disk: one checkpoint of the state (about 12 bytes per parameter with float32 params and Adam: ~39 GB for the 3B
model) is on disk at a time; the directory is deleted at the end unless ``--keep``. Results go to stdout and, with
``--json``, to a file.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from litespark_jax.checkpoint.manager import CheckpointManager
from litespark_jax.config import CheckpointConfig


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def synthetic_batch(trainer):
    t, vocab = trainer.config.train, trainer.config.model.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(t.global_batch_size, t.seq_len + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(t.seq_len, dtype=np.int32), (t.global_batch_size, 1)),
             "segment_ids": np.ones((t.global_batch_size, t.seq_len), np.int32),
             "loss_mask": np.ones((t.global_batch_size, t.seq_len), np.float32)}
    return jax.device_put(batch, trainer.batch_sharding)


def run(config, *, steps: int = 10, directory: str | None = None, keep: bool = False,
        max_overlap_steps: int = 200) -> dict:
    from litespark_jax.train.loop import Trainer

    trainer = Trainer(config)
    batch = synthetic_batch(trainer)
    state = trainer.init_state()

    def step(state):
        with trainer._sharding_context():
            state, metrics = trainer._train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        return state

    for _ in range(2):  # compile + one warm step
        state = step(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = step(state)
        times.append(time.perf_counter() - start)
    baseline = statistics.median(times)
    state_bytes = _tree_bytes(state)

    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    root = tempfile.mkdtemp(prefix="litespark-ckpt-bench-", dir=directory)
    try:
        # Synchronous save: pure save throughput (device -> host -> disk, finalized).
        sync_dir = os.path.join(root, "sync")
        manager = CheckpointManager(sync_dir, CheckpointConfig(keep_last=1, async_save=False))
        start = time.perf_counter()
        manager.save(1, state, config=config.to_dict(), force=True)
        sync_seconds = time.perf_counter() - start
        manager.close()
        disk_bytes = _disk_bytes(os.path.join(sync_dir, "1"))
        shutil.rmtree(sync_dir)

        # Asynchronous save: issued between two steps, training continues while it is written.
        manager = CheckpointManager(os.path.join(root, "async"), CheckpointConfig(keep_last=1, async_save=True))
        start = time.perf_counter()
        manager.save(2, state, config=config.to_dict(), force=True)
        blocking = time.perf_counter() - start
        overlapped = []
        finalized = None
        while len(overlapped) < max_overlap_steps:
            t0 = time.perf_counter()
            state = step(state)
            overlapped.append(time.perf_counter() - t0)
            if not manager._manager.is_saving_in_progress():
                finalized = time.perf_counter() - start
                break
        if finalized is None:
            manager.wait()
            finalized = time.perf_counter() - start
        manager.close()
        after = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state = step(state)
            after.append(time.perf_counter() - t0)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    stall = sum(overlapped) - len(overlapped) * baseline
    return {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "params": config.model.num_params(),
        "state_gb": state_bytes / 1e9,
        "disk_gb": disk_bytes / 1e9,
        "step_seconds_baseline_median": baseline,
        "step_seconds_after_save_median": statistics.median(after),
        "sync_save_seconds": sync_seconds,
        "sync_save_gb_per_s": state_bytes / 1e9 / sync_seconds,
        "async_save_blocking_seconds": blocking,
        "async_save_finalized_seconds": finalized,
        "async_save_gb_per_s": state_bytes / 1e9 / finalized,
        "async_overlapped_steps": len(overlapped),
        "async_overlapped_step_seconds_max": max(overlapped),
        "async_stall_seconds": blocking + stall,
        "async_stall_in_steps_seconds": stall,
        "async_stall_per_save_as_fraction_of_step": (blocking + stall) / baseline,
        "checkpoint_dir": root,
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"checkpoint save benchmark on {r['device']}: {r['params'] / 1e6:,.1f}M params, "
        f"TrainState {r['state_gb']:.2f} GB ({r['disk_gb']:.2f} GB on disk) in {r['checkpoint_dir']}",
        f"  step time, no save (median)        {r['step_seconds_baseline_median'] * 1e3:10.1f} ms",
        f"  synchronous save                   {r['sync_save_seconds']:10.2f} s   {r['sync_save_gb_per_s']:.2f} GB/s",
        f"  async save: save() blocks          {r['async_save_blocking_seconds']:10.2f} s",
        f"  async save: finalized after        {r['async_save_finalized_seconds']:10.2f} s   "
        f"{r['async_save_gb_per_s']:.2f} GB/s, {r['async_overlapped_steps']} steps overlapped "
        f"(slowest {r['async_overlapped_step_seconds_max'] * 1e3:.1f} ms)",
        f"  async save: extra time in those steps {r['async_stall_in_steps_seconds']:7.2f} s",
        f"  training stall per async save      {r['async_stall_seconds']:10.2f} s   "
        f"({r['async_stall_per_save_as_fraction_of_step']:.2f} steps)",
        f"  step time after the save (median)  {r['step_seconds_after_save_median'] * 1e3:10.1f} ms",
    ])


def main(argv=None) -> int:
    from litespark_jax.cli import config_parser, parse_config, require_at_least

    parser = config_parser("python -m litespark_jax.checkpoint.bench",
                           "Measure checkpoint save throughput and the training stall of an async save.")
    parser.add_argument("--steps", type=int, default=10, help="timed steps for the no-save baseline")
    parser.add_argument("--dir", default=None, help="parent directory of the temporary checkpoints (local disk)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args, config = parse_config(parser, argv)
    require_at_least(parser, args, steps=1)
    result = run(config, steps=args.steps, directory=args.dir, keep=args.keep)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
