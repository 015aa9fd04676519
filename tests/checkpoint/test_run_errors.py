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
        f"error: {tmp_path / 'empty'} is not a checkpoint directory: it holds no finalized step directories "
        f"(like {tmp_path / 'empty'}/1000 with a _CHECKPOINT_METADATA file)")
