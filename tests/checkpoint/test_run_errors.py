"""Bad resume input stops a run before any step with one line naming the path or the parameter, and the CLI turns
it into `error: ...` with exit code 2."""

import os
import subprocess
import sys

import pytest

from litespark_jax.checkpoint.manager import finalized_steps
from litespark_jax.config import load_config
from litespark_jax.errors import CheckpointError
from litespark_jax.train.loop import train
from tests.checkpoint.conftest import TINY, subprocess_env


def test_shape_mismatch_and_non_checkpoint_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    train(load_config(None, TINY + [f"train.run_dir={run_dir}", "train.steps=1"]))
    assert finalized_steps(os.path.join(run_dir, "checkpoints")) == [1]

    other = TINY + [f"train.run_dir={tmp_path / 'other'}", "train.steps=2", "model.d_ff=48",
                    f"train.resume={run_dir}/checkpoints"]
    with pytest.raises(CheckpointError, match=r"parameter 'params\.layers\.mlp\.w_down' has shape \(2, 64, 32\) but "
                                              r"the config needs \(2, 48, 32\)"):
        train(load_config(None, other))

    # train.resume=never refuses to mix a fresh run into a directory that holds checkpoints.
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(load_config(None, TINY + [f"train.run_dir={run_dir}", "train.resume=never"]))

    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "-m", "litespark_jax.train", *TINY, f"train.run_dir={tmp_path / 'x'}",
           f"train.resume={tmp_path / 'empty'}"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: train.resume: {tmp_path / 'empty'} is not a checkpoint directory: it holds no finalized step "
        f"directories (like {tmp_path / 'empty'}/1000 with a _CHECKPOINT_METADATA file)")


def _run(tmp_path, *overrides):
    return train(load_config(None, TINY + [f"train.run_dir={tmp_path / 'run'}", *overrides]))


def test_resuming_an_older_step_beside_newer_ones_is_refused(tmp_path):
    _run(tmp_path, "train.steps=4", "checkpoint.every=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(CheckpointError, match=r"resuming from .*/checkpoints/2 \(step 2\) but .* already holds the "
                                              r"newer step\(s\) \[4\]: training from there would mix two histories"):
        _run(tmp_path, "train.steps=4", "checkpoint.every=2", f"train.resume={checkpoints / '2'}")
    assert finalized_steps(str(checkpoints)) == [2, 4]


def test_a_fallback_past_an_unreadable_step_moves_it_aside_and_saves_the_retrained_one(tmp_path):
    _run(tmp_path, "train.steps=4", "checkpoint.every=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    for root, _, files in os.walk(checkpoints / "4" / "state"):
        for name in files:
            if os.sep + "d" + os.sep in os.path.join(root, name):
                os.truncate(os.path.join(root, name), 0)
    result = _run(tmp_path, "train.steps=4", "checkpoint.every=2")
    assert [h["step"] for h in result.history] == [3, 4]
    assert finalized_steps(str(checkpoints)) == [2, 4]
    assert (checkpoints / "4.unreadable").is_dir()
    # The saved step 4 is the retrained one: a third run restores it with no fallback and has nothing to train.
    assert _run(tmp_path, "train.steps=4", "checkpoint.every=2").history == []


def test_a_stray_step_named_directory_is_moved_aside_before_the_run_saves_that_step(tmp_path):
    """A folder named like a step but holding no checkpoint once made the save of that step fail mid-run."""
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "2").mkdir(parents=True)
    (checkpoints / "2" / "notes.txt").write_text("not a checkpoint")
    result = _run(tmp_path, "train.steps=2", "checkpoint.every=1")
    assert [h["step"] for h in result.history] == [1, 2]
    assert finalized_steps(str(checkpoints)) == [1, 2]
    assert (checkpoints / "2.incomplete" / "notes.txt").read_text() == "not a checkpoint"


def test_a_second_run_cannot_train_into_a_checkpoint_dir_in_use(tmp_path):
    from litespark_jax.checkpoint.session import DirectoryLock

    held = DirectoryLock(str(tmp_path / "run" / "checkpoints"))
    try:
        with pytest.raises(CheckpointError, match=rf"is in use by pid {os.getpid()} on .*: another run is training "
                                                  r"into this checkpoint.dir"):
            _run(tmp_path, "train.steps=1")
    finally:
        held.release()
    _run(tmp_path, "train.steps=1")  # released: the run trains


def test_leftover_partial_saves_are_removed_when_a_run_starts(tmp_path):
    _run(tmp_path, "train.steps=2", "checkpoint.every=1")
    leftover = tmp_path / "run" / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    _run(tmp_path, "train.steps=3")
    assert not leftover.exists()


def test_a_wrong_validation_glob_fails_before_the_first_step(tmp_path):
    from litespark_jax.errors import DataError

    with pytest.raises(DataError, match=r"data.validation_files: glob '.*/nope/\*.jsonl' matches no files"):
        _run(tmp_path, "train.steps=3", f"data.validation_files={tmp_path / 'nope'}/*.jsonl")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_records_past_the_resumed_step_leave_metrics_jsonl(tmp_path):
    import json

    _run(tmp_path, "train.steps=2", "checkpoint.every=2")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:  # an attempt that trained steps 3-4 and died before its next checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
        f.write('{"step": 5, "lo')  # cut off by the kill
    _run(tmp_path, "train.steps=4", "checkpoint.every=2")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s in steps if s > 2] == [3, 4, 4] and steps.count(3) == 1  # step 4 also has its eval record
    superseded = (tmp_path / "run" / "metrics.superseded.jsonl").read_text().splitlines()
    assert superseded[:2] == ['{"step": 3, "loss": 9.0}', '{"step": 4, "loss": 9.0}'] and len(superseded) == 3


def test_a_changed_data_order_is_refused_unless_resume_data_is_false(tmp_path, capsys):
    from litespark_jax.errors import DataError

    _run(tmp_path, "train.steps=2")
    with pytest.raises(DataError, match=r"data\.shuffle = True but this run has False"):
        _run(tmp_path, "train.steps=3", "data.shuffle=false")
    result = _run(tmp_path, "train.steps=3", "data.shuffle=false", "train.resume_data=false")
    assert [h["step"] for h in result.history] == [3]
    assert "train.resume_data=false: the data stream starts afresh" in capsys.readouterr().out


def test_a_leading_tilde_in_run_and_checkpoint_dirs_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train(load_config(None, TINY + ["train.run_dir=~/run", "checkpoint.dir=~/ckpt", "train.steps=1"]))
    assert (tmp_path / "home" / "run" / "metrics.jsonl").is_file()
    assert finalized_steps(str(tmp_path / "home" / "ckpt")) == [1]
    assert not (tmp_path / "~").exists()


def test_a_resumed_metrics_writer_tells_tensorboard_to_hide_the_earlier_attempts_later_points(tmp_path):
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    from litespark_jax.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), start_step=5)
    writer.write(6, {"loss": 1.0})
    writer.close()
    restarts = []
    for path in glob.glob(str(tmp_path / "tensorboard" / "*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):  # TFRecord framing: length, its CRC, the event, its CRC
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                restarts.append(event.step)
    assert restarts == [6]  # TensorBoard drops the points at steps >= 6 written before this marker


def test_the_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch where it is installed (3.6 s of every run's start here); a fresh process shows
    whether the writer pulled it in, and that torch still imports after."""
    pytest.importorskip("torch")  # without torch there is nothing to keep out
    script = ("import sys; from litespark_jax.metrics import MetricsWriter; "
              f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 1.0}}); w.close(); "
              "print('torch' in sys.modules); import torch; print(torch.__name__)")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "torch"]
    assert list((tmp_path / "tensorboard").iterdir())


def test_api_save_checkpoint_over_a_step_training_saved_names_it(tmp_path):
    from litespark_jax import api

    config = load_config(None, TINY + [f"train.run_dir={tmp_path / 'run'}", "train.steps=1"])
    result = train(config)
    with pytest.raises(CheckpointError, match=r"checkpoints/1 already exists \(a training run saves its last step "
                                              r"there\); pass another directory or step"):
        api.save_checkpoint(config, result.state)
    assert api.save_checkpoint(config, result.state, str(tmp_path / "copy")) == str(tmp_path / "copy" / "1")
