"""Preemption: SIGTERM finishes the step, saves, exits 0 well within 60 s, and the run resumes from that step; a
second signal aborts at once without saving."""

import os
import signal
import subprocess
import sys
import time

from litespark_jax.checkpoint.manager import finalized_steps
from tests.checkpoint.conftest import TINY, read_losses, subprocess_env


def start_training(run_dir, *extra):
    cmd = [sys.executable, "-m", "litespark_jax.train", *TINY, f"train.run_dir={run_dir}", "train.steps=100000",
           "checkpoint.every=0", *extra]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(run_dir, n, proc, timeout=180):
    deadline = time.time() + timeout
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else "training exited early"
        if os.path.exists(path) and len(read_losses(run_dir)) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError("training did not start")


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start_training(run_dir)
    wait_for_steps(run_dir, 3, proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert time.time() - sent < 60
    last = max(read_losses(run_dir))
    assert finalized_steps(os.path.join(run_dir, "checkpoints")) == [last]
    assert "preempted" in output

    resumed = start_training(run_dir)
    wait_for_steps(run_dir, last + 2, resumed)
    resumed.send_signal(signal.SIGINT)
    output, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', str(last))}" in output
    assert sorted(read_losses(run_dir))[:last + 1] == list(range(1, last + 2))


def test_second_signal_aborts_without_saving(tmp_path):
    run_dir = str(tmp_path / "run")
    log_path = tmp_path / "output.txt"
    with open(log_path, "w") as log:
        cmd = [sys.executable, "-m", "litespark_jax.train", *TINY, f"train.run_dir={run_dir}", "train.steps=100000",
               "checkpoint.every=0"]
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        wait_for_steps(run_dir, 2, proc)
        proc.send_signal(signal.SIGTERM)
        # Signals that arrive while a step runs in XLA coalesce into one; send the second once the first was seen.
        deadline = time.time() + 30
        while "received SIGTERM" not in log_path.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode != 0, log_path.read_text()[-3000:]
