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


def test_restore_onto_a_different_device_count(tmp_path):
    """Save with 8 devices (FSDP over 8), restore on 4 (FSDP over 4) and finish the run.

    Restore places every array with the 4-device shardings and verifies the per-array checksums recorded at save
    time, so the restored state is bitwise the saved one. The continued losses then match the 8-device run to
    float32 rounding only: sharding the batch and the FSDP all-gathers over 4 instead of 8 devices changes the
    order of the sums, which float arithmetic does not allow to be bitwise.
    """
    common = ["optim.decay_steps=4", "mesh.fsdp=-1"]
    eight = str(tmp_path / "eight")
    losses_8, params_8 = run_training(eight, common + ["train.steps=6", "checkpoint.every=3"], devices=8)
    four = str(tmp_path / "four")
    step_3 = os.path.join(eight, "checkpoints", "3")
    losses_4, params_4 = run_training(four, common + ["train.steps=6", "checkpoint.every=3",
                                                      f"train.resume={step_3}"], devices=4)
    assert sorted(losses_4) == [4, 5, 6]
    np.testing.assert_allclose([losses_4[s] for s in (4, 5, 6)], [losses_8[s] for s in (4, 5, 6)], rtol=1e-6)
    for name in params_8:
        np.testing.assert_allclose(params_4[name], params_8[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_same_device_count_other_layout_restores_bitwise(tmp_path):
    """Restoring the 8-device FSDP checkpoint on 8 devices as data=2 x fsdp=4 gives bitwise the same state."""
    import subprocess
    import sys

    from tests.checkpoint.conftest import TINY, subprocess_env

    common = ["optim.decay_steps=4", "train.steps=3", "checkpoint.every=3"]
    run_training(str(tmp_path / "a"), common, devices=8)
    script = """
import sys, numpy as np, jax
from litespark_jax.config import load_config
from litespark_jax.train.loop import Trainer
from litespark_jax.checkpoint.manager import CheckpointManager, flatten
config = load_config(None, sys.argv[2:])
restored = Trainer(config).restore_state(CheckpointManager(sys.argv[1], read_only=True))
flat, _ = flatten(restored.state)
print(sorted({str(v.sharding.spec) for v in flat.values()}))
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a" / "checkpoints"), *TINY, *common,
                          "mesh.data=2", "mesh.fsdp=4", f"train.run_dir={tmp_path / 'b'}"],
                         env=subprocess_env(8), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fsdp" in out.stdout
