"""How long a training run takes to start: ``python -m litespark_jax.startup_bench --config X.yaml [overrides]``.

Starts ``python -m litespark_jax.train`` a few times on one fresh compilation cache directory (the first start finds
it empty, the later ones filled) and prints, per start, the seconds from the process start to its first logged step
and to its exit. A preempted run pays its start-up again on every resume, so this is part of what a run costs
(docs/PERFORMANCE.md, "Start-up time").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from litespark_jax.cli import ArgumentParser, require_at_least, require_writable_file

# A short run: a few logged steps, one evaluation batch at the end, no checkpoint until the last step.
RUN = ["train.steps=2", "train.eval_every=0", "train.eval_batches=1", "log.every=1", "log.progress_bar=false",
       "log.tensorboard=false", "checkpoint.every=1000", "checkpoint.async_save=false"]


def time_start(config: str, overrides: list[str], run_dir: str, cache_dir: str) -> dict:
    """One ``python -m litespark_jax.train`` process: seconds to its first logged step and to its exit, the losses
    it logged, and how many compiled programs the cache holds after it."""
    cmd = [sys.executable, "-m", "litespark_jax.train", "--config", config, *RUN, *overrides,
           f"train.run_dir={run_dir}", f"train.compilation_cache_dir={cache_dir}", "train.resume=never"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the cache under test
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r and "step" in r]
    if not steps:
        raise SystemExit(f"error: {' '.join(cmd)} logged no step (log.every must be at most train.steps)")
    entries = [name for name in os.listdir(cache_dir) if name.endswith("-cache")] if os.path.isdir(cache_dir) else []
    return {"first_step_s": round(steps[0]["time"] - start, 1), "wall_s": round(end - start, 1),
            "losses": [r["loss"] for r in steps], "cache_entries": len(entries)}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.startup_bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model preset, e.g. configs/llama-3.2-1b.yaml")
    parser.add_argument("--starts", type=int, default=2, help="processes started (the first with an empty cache)")
    parser.add_argument("--jsonl", default=None, help="append one row per start to this JSONL file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every start")
    args = parser.parse_intermixed_args(argv)
    require_at_least(parser, args, starts=1)
    require_writable_file(parser, "--jsonl", args.jsonl)
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file")
    rows = []
    with tempfile.TemporaryDirectory(prefix="litespark-startup-") as work:
        cache_dir = os.path.join(work, "xla-cache")
        for i in range(args.starts):
            row = {"config": args.config, "start": i + 1, "cache": "empty" if i == 0 else "filled",
                   **time_start(args.config, args.overrides, os.path.join(work, f"run-{i + 1}"), cache_dir)}
            print(f"start {row['start']} ({row['cache']} cache): first step after {row['first_step_s']:.1f} s, "
                  f"exit after {row['wall_s']:.1f} s; {row['cache_entries']} programs in the cache", flush=True)
            rows.append(row)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
