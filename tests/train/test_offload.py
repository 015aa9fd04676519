"""optim.offload_state: Adam moments in pinned host memory between steps, streamed through the device one parameter
at a time by ``litespark_jax.train.offload.StreamedOffloadStep``.

On the CPU host and device memory are the same RAM, so these tests check what can be checked here: where every
array lives, that the streamed update is the optimizer's (against the one-program step, to float32 rounding, and a
non-finite step changes nothing), that it works on a sharded mesh and for DPO, and that checkpoint resume is bitwise.
Speed and device memory need a GPU (docs/PERFORMANCE.md).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from litespark_jax.config import OptimConfig, load_config
from litespark_jax.parallel.sharding import HOST_MEMORY
from litespark_jax.train.offload import StreamedOffloadStep
from litespark_jax.train.optimizer import build_optimizer, learning_rate_schedule
from litespark_jax.train.loop import Trainer
from litespark_jax.train.state import TrainState
from litespark_jax.train.step import step_from_gradients
from tests.checkpoint.conftest import TINY, run_training


def _memory_kinds(opt_state) -> dict[str, set]:
    """{'moments': kinds of the arrays shaped like parameters, 'scalars': kinds of the 0-d ones (counters)}."""
    leaves = jax.tree.leaves(opt_state)
    return {"moments": {x.sharding.memory_kind for x in leaves if x.ndim},
            "scalars": {x.sharding.memory_kind for x in leaves if not x.ndim}}


def test_moments_stay_in_host_memory_across_steps(tmp_path):
    trainer = Trainer(load_config(None, TINY + ["optim.offload_state=true", f"train.run_dir={tmp_path}"]))
    assert isinstance(trainer._train_step, StreamedOffloadStep)
    state = trainer.init_state()
    assert _memory_kinds(state.opt_state) == {"moments": {HOST_MEMORY}, "scalars": {"device"}}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}
    iterator = iter(trainer.train_iterator())
    structure = jax.tree.structure(state)
    with trainer._sharding_context():  # as the bench: compiled ahead (twice works), then run
        for _ in range(2):  # (a Compiled refuses other trees than those it was compiled for)
            trainer._train_step.compile(state, trainer.step_batch(next(iter(trainer.train_iterator()))))
    for _ in range(2):
        state, metrics = trainer.train_step(state, next(iterator))
        assert jax.tree.structure(state) == structure  # nnx Params and all: checkpoints and the next step see one tree
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
    assert _memory_kinds(state.opt_state) == {"moments": {HOST_MEMORY}, "scalars": {"device"}}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}
    # The largest parameters update first, so the copy back that nothing overlaps is a small one.
    step = trainer._train_step
    sizes = [jax.tree.leaves(state.params)[i].size for i in step._order]
    assert sizes == sorted(sizes, reverse=True)


# A toy model: the gradients are set by the batch, so each step's update can be checked alone.
def _toy_params():
    return {"w": jnp.linspace(-1.0, 1.0, 96, dtype=jnp.float32).reshape(8, 12),
            "norm": {"scale": jnp.ones((12,), jnp.float32)},
            "b": jnp.linspace(0.5, 2.0, 40, dtype=jnp.float32).reshape(5, 8)}


def _toy_gradients(params, batch):
    """Gradient sums ``batch["g"] * (index + 1)`` in bf16 for ``w`` (as the layer matrices with cast_weights_once),
    float32 for the rest; ``batch["n"]`` tokens; the loss ``batch["loss"]``."""
    grads = {"w": (batch["g"] * jnp.arange(96.0).reshape(8, 12)).astype(jnp.bfloat16),
             "norm": {"scale": batch["g"] * jnp.ones((12,))},
             "b": batch["g"] * (jnp.arange(40.0).reshape(5, 8) - 3.0)}
    return grads, batch["n"], {"loss": batch["loss"], "tokens": batch["n"]}


def _toy_states(optim: OptimConfig):
    mesh = jax.make_mesh((1,), ("d",))
    device = NamedSharding(mesh, PartitionSpec())
    optimizer = build_optimizer(optim, 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=_toy_params(), opt_state=optimizer.init(_toy_params()))
    host = TrainState(step=device, params=jax.tree.map(lambda _: device, state.params),
                      opt_state=jax.tree.map(lambda x: device.with_memory_kind(HOST_MEMORY) if x.ndim else device,
                                             state.opt_state))
    # Two states that share no buffer: each step spends (donates) the state it is given.
    host_state = jax.device_put(jax.tree.map(jnp.copy, state), host)
    return optimizer, state, host_state, host


@pytest.mark.parametrize("state_dtype, grad_clip", [("float32", 1.0), ("bfloat16", 1.0), ("bfloat16", 0.0)])
def test_streamed_update_is_the_optimizers_update(state_dtype, grad_clip):
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=2, state_dtype=state_dtype, grad_clip=grad_clip,
                        offload_state=True)
    optimizer, state, host_state, host_sharding = _toy_states(optim)
    schedule = learning_rate_schedule(optim, 10)
    reference = jax.jit(step_from_gradients(_toy_gradients, optimizer, schedule))
    streamed = StreamedOffloadStep(_toy_gradients, optim, 10, host_sharding, None, schedule)
    # Small gradients (not clipped), large ones (clipped), then a non-finite loss: that step changes nothing. The
    # scales are powers of two, so the bf16 gradient of ``w`` is exact: on a GPU, XLA drops a bf16 rounding between
    # two float32 values inside one program (the reference's), which the streamed step's two programs keep.
    for g, loss in ((2.0 ** -9, 1.0), (4.0, 2.0), (0.5, float("nan")), (-0.25, 1.5)):
        batch = {"g": jnp.float32(g), "n": jnp.float32(4.0), "loss": jnp.float32(loss)}
        before = jax.tree.map(np.asarray, host_state)
        state, expected = reference(state, batch)
        spent = host_state
        host_state, metrics = streamed(host_state, batch)
        # The largest parameter's old host moments are freed within the step (two copies slowed the 7B 2.5x).
        assert all(x.is_deleted() for x in jax.tree.leaves(spent.opt_state) if x.shape == (8, 12))
        assert set(metrics) == set(expected)
        for key in expected:
            np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-6, err_msg=key)
        for a, b in zip(jax.tree.leaves(host_state), jax.tree.leaves(state)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-6, atol=1e-9)
        if np.isnan(loss):
            for a, b in zip(jax.tree.leaves(host_state.params), jax.tree.leaves(before.params)):
                np.testing.assert_array_equal(a, b)
            for a, b in zip(jax.tree.leaves(host_state.opt_state), jax.tree.leaves(before.opt_state)):
                np.testing.assert_array_equal(a, b)
        assert _memory_kinds(host_state.opt_state) == {"moments": {HOST_MEMORY}, "scalars": {"device"}}
    assert int(host_state.step) == 4 and int(host_state.opt_state[-1].count) == 3  # the schedule skips the NaN step


def _assert_close_runs(a, b):
    (losses_a, params_a), (losses_b, params_b) = a, b
    assert losses_a.keys() == losses_b.keys()
    np.testing.assert_allclose([losses_a[s] for s in losses_a], [losses_b[s] for s in losses_a], rtol=1e-6)
    for name in params_a:
        np.testing.assert_allclose(params_a[name], params_b[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_offloaded_training_matches_the_device_run_and_resumes_bitwise(tmp_path):
    common = ["optim.decay_steps=4", "train.steps=6"]
    device = run_training(str(tmp_path / "device"), common + ["checkpoint.every=0"])
    off = common + ["optim.offload_state=true"]
    offloaded = run_training(str(tmp_path / "host"), off + ["checkpoint.every=3"])
    _assert_close_runs(offloaded, device)
    step_3 = os.path.join(tmp_path, "host", "checkpoints", "3")
    resumed_losses, resumed_params = run_training(str(tmp_path / "resumed"),
                                                  off + ["checkpoint.every=0", f"train.resume={step_3}"])
    assert resumed_losses == {s: offloaded[0][s] for s in (4, 5, 6)}
    for name, value in offloaded[1].items():
        np.testing.assert_array_equal(resumed_params[name], value, err_msg=name)


def test_offloaded_training_on_a_sharded_mesh_matches_the_device_run(tmp_path):
    common = ["train.steps=3", "checkpoint.every=0", "mesh.fsdp=2", "mesh.tensor=2"]
    device = run_training(str(tmp_path / "device"), common, devices=4)
    offloaded = run_training(str(tmp_path / "host"), common + ["optim.offload_state=true"], devices=4)
    _assert_close_runs(offloaded, device)
