"""optim.offload_state: Adam moments in pinned host memory between steps, moved to the device for the update.

On the CPU host and device memory are the same RAM, so these tests check what can be checked here: where every
array lives, that the step lowered for CUDA carries the host<->device transfers XLA needs, and that training and
checkpoint resume are bitwise those of the run without offloading. Speed and device memory need a GPU.
"""

import os
import re

import jax
import numpy as np

from litespark_jax.config import load_config
from litespark_jax.parallel.sharding import HOST_MEMORY
from litespark_jax.train.loop import Trainer
from tests.checkpoint.conftest import TINY, run_training


def _memory_kinds(opt_state) -> dict[str, set]:
    """{'moments': kinds of the arrays shaped like parameters, 'scalars': kinds of the 0-d ones (counters)}."""
    leaves = jax.tree.leaves(opt_state)
    return {"moments": {x.sharding.memory_kind for x in leaves if x.ndim},
            "scalars": {x.sharding.memory_kind for x in leaves if not x.ndim}}


def test_moments_live_on_the_host_and_the_cuda_step_moves_them(tmp_path):
    trainer = Trainer(load_config(None, TINY + ["optim.offload_state=true", f"train.run_dir={tmp_path}"]))
    state = trainer.init_state()
    assert _memory_kinds(state.opt_state) == {"moments": {HOST_MEMORY}, "scalars": {"device"}}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}

    local_batch = next(iter(trainer.train_iterator()))
    with trainer._sharding_context():
        hlo = trainer._train_step.trace(state, trainer.step_batch(local_batch)).lower(
            lowering_platforms=("cuda",)).as_text()
    moments = sum(x.ndim > 0 for x in jax.tree.leaves(state.opt_state))
    # Every moment is brought to the device for the update and its new value placed back in host memory.
    assert len(re.findall(r'_xla_buffer_placement = "pinned_host"', hlo)) == moments
    assert len(re.findall(r'_xla_buffer_placement = "device"', hlo)) >= moments

    new_state, metrics = trainer.train_step(state, local_batch)
    assert np.isfinite(float(metrics["loss"]))
    assert _memory_kinds(new_state.opt_state) == {"moments": {HOST_MEMORY}, "scalars": {"device"}}


def test_offloaded_training_and_resume_are_bitwise_the_device_run(tmp_path):
    common = ["optim.decay_steps=4", "train.steps=6"]
    losses, params = run_training(str(tmp_path / "device"), common + ["checkpoint.every=0"])
    off = common + ["optim.offload_state=true"]
    off_losses, off_params = run_training(str(tmp_path / "host"), off + ["checkpoint.every=3"])
    step_3 = os.path.join(tmp_path, "host", "checkpoints", "3")
    resumed_losses, resumed_params = run_training(str(tmp_path / "resumed"),
                                                  off + ["checkpoint.every=0", f"train.resume={step_3}"])
    assert off_losses == losses
    assert resumed_losses == {s: losses[s] for s in (4, 5, 6)}
    for name in params:
        np.testing.assert_array_equal(off_params[name], params[name], err_msg=name)
        np.testing.assert_array_equal(resumed_params[name], params[name], err_msg=name)
