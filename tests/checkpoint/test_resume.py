"""Exact resume: a run interrupted at step 3 and resumed to step 6 equals an uninterrupted 6-step run, bitwise;
across a change of device count (8 -> 4, FSDP over all devices) the restored state is bitwise the saved one."""

import os

import numpy as np

from tests.checkpoint.conftest import run_training


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    # optim.decay_steps is fixed so the learning-rate schedule does not depend on train.steps: the 3-step run is
    # exactly the first half of the 6-step one (the preemption test interrupts a run with a signal instead).
    common = ["optim.decay_steps=4"]
    full_losses, full_params = run_training(str(tmp_path / "full"), common + ["train.steps=6", "checkpoint.every=3"])
    part = str(tmp_path / "part")
    first, _ = run_training(part, common + ["train.steps=3", "checkpoint.every=0"])
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["3"]
    # Same run directory: train.resume=auto picks up step 3 and its data-iterator position.
    resumed_losses, resumed_params = run_training(part, common + ["train.steps=6", "checkpoint.every=3"])
    assert {s: full_losses[s] for s in (1, 2, 3)} == first
    assert {s: resumed_losses[s] for s in (4, 5, 6)} == {s: full_losses[s] for s in (4, 5, 6)}
    assert full_params.keys() == resumed_params.keys()
    for name in full_params:
        np.testing.assert_array_equal(resumed_params[name], full_params[name], err_msg=name)
