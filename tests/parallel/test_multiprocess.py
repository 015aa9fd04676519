"""2 processes x 4 CPU devices through jax.distributed (gloo): train, checkpoint, resume on 1 process x 8 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from litespark_jax.checkpoint.manager import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for key in ("LITESPARK_COORDINATOR", "LITESPARK_NUM_PROCESSES", "LITESPARK_PROCESS_ID", "SLURM_JOB_ID",
                "JOBSET_NAME"):
        env.pop(key, None)
    env.update(extra)
    return env


def test_rendezvous_timeout_names_the_coordinator():
    # One of two processes never starts: the rendezvous fails after the timeout with a clear one-line error.
    code = ("from litespark_jax.parallel.distributed import initialize_from_env\n"
            "initialize_from_env()\n")
    env = _env(LITESPARK_COORDINATOR="127.0.0.1:1", LITESPARK_NUM_PROCESSES="2", LITESPARK_PROCESS_ID="1",
               LITESPARK_INIT_TIMEOUT_S="3")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75  # EX_TEMPFAIL: the scheduler may retry
    assert "could not rendezvous with the coordinator 127.0.0.1:1 within 3s" in proc.stderr


TINY = ["model.vocab_size=512", "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.d_ff=64", "model.max_seq_len=32", "train.seq_len=16", "train.global_batch_size=8",
        "train.eval_every=0", "train.eval_batches=1", "log.every=1", "log.progress_bar=false",
        "log.tensorboard=false", "optim.warmup_steps=2", "optim.decay_steps=4", "mesh.data=2", "mesh.fsdp=-1"]


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _two_processes_then_one(tmp_path, devices_per_process: int, two_overrides: list[str],
                            one_overrides: list[str]):
    """Train with ``two_overrides`` on 2 processes x ``devices_per_process`` devices (launch/local.py), then with
    ``one_overrides`` on 1 process with as many devices; returns the two run directories."""
    two, one = tmp_path / "two", tmp_path / "one"
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", str(devices_per_process), "--timeout", "600", "--"]
    proc = subprocess.run(launcher + [sys.executable, "-m", "litespark_jax.train", *two_overrides,
                                      f"train.run_dir={two}"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-4000:]
    devices = f"--xla_force_host_platform_device_count={2 * devices_per_process}"
    proc = subprocess.run([sys.executable, "-m", "litespark_jax.train", *one_overrides, f"train.run_dir={one}"],
                          env=_env(XLA_FLAGS=devices), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return two, one


def test_train_cli_two_processes_then_resume_on_one(tmp_path):
    """``python -m litespark_jax.train`` (Trainer, data pipeline, checkpoints) on 2 processes x 4 devices, resumed
    from its step-3 checkpoint with ``train.resume`` on 1 process x 8 devices: steps 4-6 give the same losses and the
    final parameters agree (float32 sums in another order)."""
    two, one = tmp_path / "two", tmp_path / "one"
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", "4", "--timeout", "600", "--"]
    proc = subprocess.run(launcher + [sys.executable, "-m", "litespark_jax.train", *TINY, "train.steps=6",
                                      "checkpoint.every=3", f"train.run_dir={two}"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(os.listdir(two / "checkpoints")) == ["3", "6"]
    proc = subprocess.run([sys.executable, "-m", "litespark_jax.train", *TINY, "train.steps=6", "checkpoint.every=3",
                           f"train.run_dir={one}", f"train.resume={two / 'checkpoints' / '3'}"],
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full, resumed = _losses(two), _losses(one)
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed[step] - full[step]) <= 1e-6 * abs(full[step]), (step, resumed[step], full[step])
    final = [CheckpointManager(str(run / "checkpoints"), read_only=True).restore_arrays("params.", step=6).state
             for run in (two, one)]
    assert final[0].keys() == final[1].keys() and final[0]
    for name in final[0]:
        np.testing.assert_allclose(np.asarray(final[1][name]), np.asarray(final[0][name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_a_checkpoint_one_process_cannot_read_is_skipped_by_all(tmp_path):
    """Each process reads only its own shards: when process 1's part of step 6 was damaged, process 1 alone fell
    back to step 3 while process 0 waited in orbax's closing barrier of the read, forever. Now both skip step 6."""
    run = tmp_path / "run"
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", "4", "--timeout", "300", "--"]
    train = [sys.executable, "-m", "litespark_jax.train", *TINY, "mesh.data=1", "mesh.fsdp=8", "checkpoint.every=3",
             f"train.run_dir={run}"]  # parameters split over both processes: each writes shards of its own
    proc = subprocess.run(launcher + train + ["train.steps=6"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    damaged = run / "checkpoints" / "6" / "state" / "ocdbt.process_1" / "d"
    files = sorted(damaged.iterdir())
    assert files, sorted(os.listdir(run / "checkpoints" / "6" / "state"))
    for path in files:
        os.truncate(path, 100)
    proc = subprocess.run(launcher + train + ["train.steps=7", "train.resume=auto"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "resumed from" in proc.stdout and "(step 3)" in proc.stdout, proc.stdout[-4000:]
    assert "process 1 could not read its part" in proc.stdout, proc.stdout[-4000:]
    # step 6 set aside for inspection, trained again and saved under its number
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6", "6.unreadable", "7"], os.listdir(run / "checkpoints")


def test_tensor_parallel_across_processes_trains_on_the_configured_batch(tmp_path):
    """Tensor parallelism spanning the 2 processes: both hold every row of the batch, so both must build the same
    rows. Each built the block numbered by its process index, and JAX assembled a batch of half the size, each tensor
    half computing on other rows (losses 11% off, no error). Same losses as 1 process x 8 devices, same mesh."""
    mesh = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.inter_node_tensor=2", "mesh.inter_node_fsdp=1"]
    common = [*TINY, "train.steps=3", "checkpoint.every=0", "train.eval_every=3"]
    two, one = _two_processes_then_one(tmp_path, 4, common + mesh, common + mesh[:3])
    full, single = _losses(two), _losses(one)
    assert sorted(full) == sorted(single) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(full[step] - single[step]) <= 1e-6 * abs(single[step]), (step, full[step], single[step])
    evals = [_eval_losses(run) for run in (two, one)]
    assert evals[0] and abs(evals[0][-1] - evals[1][-1]) <= 1e-6 * abs(evals[1][-1]), evals


def test_dpo_with_a_precomputed_reference_on_two_processes(tmp_path):
    """The reference log-probs are read back from each process's own shards (reading the whole global array raised
    on 2 processes). At step 1 the policy is the reference, so the loss is ln 2 exactly when every row got its own
    reference log-probs. 9 eval pairs split 5 / 4 between the processes: 3 batches of 2 pairs on one, 2 on the other
    (the one with fewer stopped calling the collective eval step and the other waited forever)."""
    run = tmp_path / "dpo"
    bundled = os.path.join(ROOT, "litespark_jax", "posttrain", "examples")
    for name, count in (("train", 10), ("eval", 9)):
        with open(os.path.join(bundled, f"dpo_{name}.jsonl")) as src, open(tmp_path / f"{name}.jsonl", "w") as dst:
            dst.writelines(src.readlines()[:count])
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", "4", "--timeout", "300", "--"]
    proc = subprocess.run(launcher + [sys.executable, "-m", "litespark_jax.dpo", "--config", "configs/dpo-tiny.yaml",
                                      f"posttrain.train_file={tmp_path / 'train.jsonl'}",
                                      f"posttrain.eval_file={tmp_path / 'eval.jsonl'}", "train.global_batch_size=8",
                                      "train.steps=2", "log.every=1", "train.eval_every=0", "train.eval_batches=1",
                                      "log.progress_bar=false", "checkpoint.every=0", f"train.run_dir={run}"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    losses = _losses(run)
    assert sorted(losses) == [1, 2] and abs(losses[1] - np.log(2)) < 1e-5, losses
    with open(run / "dpo_summary.json") as f:
        summary = json.load(f)
    assert summary["before"]["pairs"] == 9 and summary["after"]["pairs"] == 9, summary
    assert summary["train_before"]["pairs"] == 4, summary  # eval_batches=1: one batch of 2 pairs per process
    assert abs(summary["before"]["loss"] - np.log(2)) < 1e-5, summary


def test_sft_eval_on_two_processes_with_uneven_shards(tmp_path):
    """9 eval conversations, one row each (unpacked), split 5 / 4: 2 batches of 4 rows on one process, 1 on the
    other (the evaluation waited forever for the process that had stopped). At step 1 the weights are still the
    initial ones (the warmup's first learning rate is 0), so the eval loss, a mean over every assistant token, is the
    one process's."""
    bundled = os.path.join(ROOT, "litespark_jax", "posttrain", "examples")
    with open(os.path.join(bundled, "sft_eval.jsonl")) as src, open(tmp_path / "eval.jsonl", "w") as dst:
        dst.writelines(src.readlines()[:9])
    args = ["-m", "litespark_jax.sft", "--config", "configs/sft-tiny.yaml", *TINY[:6], "train.seq_len=128",
            f"posttrain.eval_file={tmp_path}/eval.jsonl", "posttrain.pack=false", "train.global_batch_size=8",
            "train.steps=1", "train.eval_every=1", "train.eval_batches=10", "log.every=1", "log.progress_bar=false",
            "checkpoint.every=0"]
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", "4", "--timeout", "300", "--"]
    proc = subprocess.run(launcher + [sys.executable, *args, f"train.run_dir={tmp_path / 'two'}"], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    proc = subprocess.run([sys.executable, *args, f"train.run_dir={tmp_path / 'one'}"],
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = _eval_losses(tmp_path / "two"), _eval_losses(tmp_path / "one")
    assert len(two) == len(one) == 1 and abs(two[0] - one[0]) <= 1e-5 * one[0], (two, one)


def test_packed_sft_resumes_each_process_at_its_own_data_position(tmp_path):
    """Packing consumes examples at a different pace on each process (here even lines are long, one per row, and odd
    lines short, many per row), and only process 0 writes the checkpoint's data position: process 1 resumed from
    process 0's and trained on other rows than the uninterrupted run. Both positions are saved now."""
    lines = [{"prompt": f"question {i}", "completion": ("long answer " * 30 if i % 2 == 0 else f"short {i}")}
             for i in range(80)]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", "4", "--timeout", "300", "--"]
    sft = [sys.executable, "-m", "litespark_jax.sft", "--config", "configs/sft-tiny.yaml", *TINY[:6],
           "train.seq_len=512", "log.every=1", "log.progress_bar=false", "log.tensorboard=false", "mesh.data=2",
           "mesh.fsdp=-1", "train.eval_every=0", f"posttrain.train_file={tmp_path / 'train.jsonl'}",
           "train.steps=6", "checkpoint.every=4"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = subprocess.run(launcher + sft + [f"train.run_dir={full}"], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(full / "checkpoints" / "4" / "data" / "metadata") as f:
        assert "per_row_block" in json.load(f)["iterator"]  # the packer's positions part at step 4 (16 rows)
    proc = subprocess.run(launcher + sft + [f"train.run_dir={resumed}", f"train.resume={full / 'checkpoints' / '4'}"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [5, 6], b
    for step in (5, 6):
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def _workers(launcher_pid: int) -> dict[int, int]:
    """{LITESPARK_PROCESS_ID: pid} of the launcher's worker processes (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            found[int(env[b"LITESPARK_PROCESS_ID"])] = int(entry)
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return found


def test_sigterm_to_one_process_saves_the_same_step_on_all_and_exits(tmp_path):
    """A SIGTERM that reaches one process only (a node evicted alone): that process saved and left, the other waited
    in the next step's collectives forever. JAX's preemption service now takes the notice to every process, and
    they save the same step and exit 0."""
    import signal
    import time

    run = tmp_path / "run"
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
                "--devices-per-process", "4", "--timeout", "300", "--"]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(launcher + [sys.executable, "-m", "litespark_jax.train", *TINY, "train.steps=100000",
                                            "checkpoint.every=0", f"train.run_dir={run}"],
                                env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(_losses(run) if (run / "metrics.jsonl").exists()
                                                                     else {}) < 3:
            time.sleep(0.5)
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1], (workers, log_path.read_text()[-3000:])
        os.kill(workers[1], signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    saved = sorted(int(name) for name in os.listdir(run / "checkpoints") if name.isdigit())
    assert len(saved) == 1, (saved, text[-3000:])
    for i in (0, 1):  # both processes stopped at the saved step
        assert f"[{i}] preempted: saved step {saved[0]}" in text, text[-3000:]


def _eval_losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]


@pytest.mark.parametrize("flags, message", [
    (["--processes", "0"], "--processes 0: must be at least 1"),  # ran nothing and exited 0
    (["--devices-per-process", "0"], "--devices-per-process 0: must be at least 1"),
    (["--timeout", "-5"], "--timeout -5: must be positive"),
])
def test_launcher_refuses_counts_that_start_nothing(flags, message):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), *flags, "--", sys.executable,
                           "-c", "print('started')"], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "started" not in proc.stdout, proc.stderr


def _launch_shell(script: str, processes: int = 3, timeout: int = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", str(processes),
                           "--", "bash", "-c", script], env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("failing", [0, 2])
def test_launcher_stops_the_others_when_any_process_fails(failing):
    """Process 2 failing used to go unseen while process 0 ran: the launcher polled only up to the first process
    still running."""
    proc, seconds = _launch_shell(f'if [ "$LITESPARK_PROCESS_ID" = {failing} ]; then exit 5; fi; sleep 30; echo done')
    assert proc.returncode == 5, (proc.returncode, proc.stdout, proc.stderr)
    assert "done" not in proc.stdout and seconds < 25, (seconds, proc.stdout)


def test_launcher_reports_a_killed_process_as_a_shell_does():
    proc, _ = _launch_shell('if [ "$LITESPARK_PROCESS_ID" = 1 ]; then kill -9 $$; fi; sleep 30', processes=2)
    assert proc.returncode == 128 + 9, (proc.returncode, proc.stderr)


def test_launcher_names_a_command_it_cannot_run():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--", "no-such-command-xyz"],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "local.py: error: cannot run 'no-such-command-xyz': No such file or directory (see --help)"], proc.stderr


def test_offloaded_moments_on_two_processes_train_like_one_process_without(tmp_path):
    """optim.offload_state's streamed step copies each process's shards of the moments (train/offload.py): on 2
    processes x 2 devices its losses are those of 1 process x 4 devices with the moments on the devices."""
    common = [*TINY, "train.steps=3", "checkpoint.every=0"]
    two, one = _two_processes_then_one(tmp_path, 2, common + ["optim.offload_state=true"], common)
    offloaded, on_device = _losses(two), _losses(one)
    assert sorted(offloaded) == sorted(on_device) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(offloaded[step] - on_device[step]) <= 1e-6 * abs(on_device[step]), step
