"""Fault injection: a tiny training run is killed with SIGKILL 20+ times at seeded random moments (while it restores,
inside or between steps, during an asynchronous checkpoint write) and resumed with train.resume=auto after each.

What must hold, bit for bit against one uninterrupted run of the same config:
- every process resumes from the newest finalized checkpoint at the time it starts, and logs the steps after it
  with no gap and no repeat (a step is re-run only when it came after the last finalized checkpoint of a killed
  process, which is what a checkpoint interval means);
- every loss any process logged equals the uninterrupted run's loss for that step;
- the final checkpoint's parameters and optimizer state equal the uninterrupted run's.

The persistent compilation cache keeps each restart to a few seconds, so the suite fits CI on 2 cores.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps
from tests.checkpoint.conftest import TINY, subprocess_env

KILLS = 22
TIME_BOUND_S = 600  # a hang guard for CI; ~80 s on 2 idle cores
STEPS = 120
CONFIG = TINY + ["model.num_layers=1", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep_last=2",
                 "checkpoint.async_save=true", "optim.decay_steps=80"]


def _env(cache_dir):
    env = subprocess_env()
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(run_dir, env, log_path):
    cmd = [sys.executable, "-m", "litespark_jax.train", *CONFIG, f"train.run_dir={run_dir}", "train.resume=auto"]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(records, since: float = 0.0):
    """(step, loss) of the records written at or after ``since`` (a wall-clock time)."""
    return [(r["step"], r["loss"]) for r in records if "loss" in r and r["time"] >= since]


def _tmp_dirs(checkpoint_dir) -> set:
    """Unfinalized orbax step directories (``<step>.orbax-checkpoint-tmp-<timestamp>``)."""
    if not os.path.isdir(checkpoint_dir):
        return set()
    return {name for name in os.listdir(checkpoint_dir) if ".orbax-checkpoint-tmp" in name}


def _wait_and_kill(proc, run_dir, checkpoint_dir, attempt_start, rng):
    """Kill ``proc`` at a random moment of one of three kinds; returns (kind, whether a save of this process was in
    flight) or None when the process finished first."""
    leftover = _tmp_dirs(checkpoint_dir)  # partial writes of earlier killed processes, cleaned up on resume

    def saving():
        return bool(_tmp_dirs(checkpoint_dir) - leftover)

    kind = rng.choice(["startup", "step", "step", "save", "save"])
    deadline = time.time() + 120
    target_steps = rng.randint(1, 3)
    delay = rng.uniform(0.0, 0.03)
    started = time.time()
    startup_delay = rng.uniform(0.5, 4.0)
    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        if kind == "startup" and time.time() - started >= startup_delay:
            break
        if kind != "startup":
            logged = len(_losses(_records(run_dir), since=attempt_start))
            if kind == "save" and logged >= 1 and saving():
                break
            if kind == "step" and logged >= target_steps:
                time.sleep(delay)
                break
            if kind == "save" and logged >= 6:  # no save seen in flight: fall back to a mid-step kill
                kind = "step"
        time.sleep(0.002)
    in_flight = saving()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return kind, in_flight


def _final_arrays(checkpoint_dir, prefix):
    return CheckpointManager(checkpoint_dir, read_only=True).restore_arrays(prefix, step=STEPS).state


@pytest.mark.optimized_xla
def test_kill_9_at_random_moments_resumes_bitwise(tmp_path):
    began = time.time()
    env = _env(tmp_path / "jax-cache")
    reference = str(tmp_path / "reference")
    proc = _start(reference, env, tmp_path / "reference.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = dict(_losses(_records(reference)))
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = str(tmp_path / "faulty")
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    rng = random.Random(1234)
    kills, kinds, in_flight, segments = 0, {}, 0, []
    for attempt in range(KILLS + 10):
        assert time.time() - began < TIME_BOUND_S, f"fault injection exceeded {TIME_BOUND_S} s after {kills} kills"
        resume_from = (finalized_steps(checkpoint_dir) or [0])[-1]
        attempt_start = time.time()
        log_path = tmp_path / f"attempt-{attempt}.log"
        proc = _start(run_dir, env, log_path)
        done = kills >= KILLS
        outcome = None if done else _wait_and_kill(proc, run_dir, checkpoint_dir, attempt_start, rng)
        if outcome is None:
            assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        else:
            kills += 1
            kinds[outcome[0]] = kinds.get(outcome[0], 0) + 1
            in_flight += outcome[1]
        logged = _losses(_records(run_dir), since=attempt_start)
        segments.append((resume_from, [s for s, _ in logged]))
        if logged:
            assert f"(step {resume_from})" in log_path.read_text() or resume_from == 0
        if outcome is None:
            break
    print(f"kills survived: {kills} {kinds}; kills with a checkpoint write in flight: {in_flight}; "
          f"{sum(len(steps) for _, steps in segments)} steps logged for {STEPS}; {time.time() - began:.0f} s")
    assert kills >= 20
    assert in_flight >= 1  # at least one kill landed inside an asynchronous checkpoint write (10 of 22 when measured)

    # No step after the last finalized checkpoint is skipped or repeated: each process logs K+1, K+2, ...
    for resume_from, steps in segments:
        assert steps == list(range(resume_from + 1, resume_from + 1 + len(steps))), (resume_from, steps)
    assert segments[-1][1][-1] == STEPS
    assert not _tmp_dirs(checkpoint_dir)  # partial writes of killed processes were cleaned up
    # metrics.jsonl holds one record per step: a resumed process moves the records its killed predecessor wrote past
    # the checkpoint it resumes from to metrics.superseded.jsonl.
    kept = _losses(_records(run_dir))
    assert [s for s, _ in kept] == list(range(1, STEPS + 1))
    with open(os.path.join(run_dir, "metrics.superseded.jsonl")) as f:
        moved = _losses([json.loads(line) for line in f if line.strip().endswith("}")])
    assert moved  # killed processes had logged steps past their last finalized checkpoint
    # Every logged loss, of every process, equals the uninterrupted run's bitwise.
    logged = kept + moved
    mismatched = [(s, loss, expected[s]) for s, loss in logged if loss != expected[s]]
    assert not mismatched, mismatched[:5]
    # The final parameters and optimizer state equal the uninterrupted run's bitwise.
    for prefix in ("params.", "opt_state."):
        want, got = _final_arrays(os.path.join(reference, "checkpoints"), prefix), _final_arrays(checkpoint_dir, prefix)
        assert want.keys() == got.keys() and want
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=prefix + name)
