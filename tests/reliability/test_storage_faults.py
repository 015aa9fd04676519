"""Storage faults during a training run: the disk fills up during a save, the checkpoint directory becomes
unwritable, the checkpoints are deleted under the run. Each is reported in one line (CheckpointError, which the
CLI prints as `error: ...` with exit code 2) or survived, and what was finalized before stays restorable."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps
from litespark_jax.config import load_config
from litespark_jax.errors import CheckpointError
from litespark_jax.train.loop import train
from tests.checkpoint.conftest import TINY


def _config(tmp_path, *extra):
    return load_config(None, TINY + [f"train.run_dir={tmp_path / 'run'}", "optim.decay_steps=4", *extra])


def _restorable(directory):
    restored = CheckpointManager(str(directory), read_only=True).restore_arrays()  # checksums verified
    assert all(np.isfinite(v).all() for v in restored.state.values())
    return restored.step


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        config = _config(tmp_path, "train.steps=12", "checkpoint.every=1", "checkpoint.keep_last=20",
                         f"checkpoint.dir={mount / 'ck'}")
        with pytest.raises(CheckpointError, match=r"no space left on device while saving checkpoint step \d+ to "
                                                  r".*/ck; the previous checkpoint .*/ck/\d+ is intact"):
            train(config)
        steps = finalized_steps(str(mount / "ck"))
        assert steps and steps == list(range(1, len(steps) + 1))
        assert not [n for n in os.listdir(mount / "ck") if "tmp" in n]  # the partial save was removed
        assert _restorable(mount / "ck") == steps[-1]
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_simulated_no_space_error_is_reported_and_nothing_is_half_written(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 4:
            raise RuntimeError("write failed") from OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    config = _config(tmp_path, "train.steps=6", "checkpoint.every=2")
    with pytest.raises(CheckpointError, match=r"no space left on device while saving checkpoint step 4 .*"
                                              r"the previous checkpoint .*/checkpoints/2 is intact"):
        train(config)
    directory = tmp_path / "run" / "checkpoints"
    assert finalized_steps(str(directory)) == [2] and _restorable(directory) == 2


def test_checkpoint_directory_becomes_unwritable_mid_run(tmp_path):
    directory = tmp_path / "run" / "checkpoints"

    def block(step, metrics):
        if step == 3:  # a file where the directory was: nothing can be written there any more
            shutil.rmtree(directory)
            directory.write_text("not a directory")

    config = _config(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.async_save=false")
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 to .*/checkpoints failed"):
        train(config, callback=block)


def test_checkpoints_deleted_under_the_run_are_written_again(tmp_path):
    directory = tmp_path / "run" / "checkpoints"

    def delete(step, metrics):
        if step == 3:
            shutil.rmtree(directory)

    config = _config(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.async_save=false")
    result = train(config, callback=delete)
    assert int(result.state.step) == 6
    assert finalized_steps(str(directory)) == [4, 6] and _restorable(directory) == 6
