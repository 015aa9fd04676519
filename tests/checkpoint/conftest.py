"""Helpers shared by the checkpoint tests: a tiny model's overrides and a training run in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = [
    "model.vocab_size=512", "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=32", "train.seq_len=16", "train.global_batch_size=8", "train.eval_every=0",
    "train.eval_batches=1", "log.every=1", "log.progress_bar=false", "log.tensorboard=false", "optim.warmup_steps=2",
]

# Runs train() and dumps the final parameters, so that a parent process can compare runs bitwise.
_RUNNER = """
import sys, numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
from litespark_jax.config import load_config
from litespark_jax.train.loop import train
from litespark_jax.checkpoint.manager import flatten
out, overrides = sys.argv[1], sys.argv[2:]
result = train(load_config(None, overrides))
flat, _ = flatten(result.state.params)
np.savez(out, **{k: np.asarray(jax.device_get(v)) for k, v in flat.items()})
"""


def subprocess_env(devices: int | None = None) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_training(run_dir: str, overrides: list[str], devices: int | None = None, timeout: int = 300):
    """Train in a fresh process; returns ({step: loss} from metrics.jsonl, {name: final param array})."""
    import numpy as np

    params_file = os.path.join(run_dir + "-params.npz")
    cmd = [sys.executable, "-c", _RUNNER, params_file, *TINY, f"train.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=subprocess_env(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_losses(run_dir), dict(np.load(params_file))


def read_losses(run_dir: str) -> dict[int, float]:
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


@pytest.fixture
def tiny_overrides():
    return list(TINY)
