"""Numerical guards: a non-finite step is never applied (skip counts it, stop exits with the last good checkpoint
intact), and a loss spike rolls back to the last checkpoint and skips the data that caused it."""

import os

import jax
import numpy as np
import pytest

from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps, flatten
from litespark_jax.config import load_config
from litespark_jax.errors import ConfigError, NumericalError
from litespark_jax.train.loop import Trainer, train
from tests.checkpoint.conftest import TINY


class FaultyTrainer(Trainer):
    """Injects faults by call number: a NaN loss mask (non-finite loss and gradient) or a x100 reported loss."""

    def __init__(self, config, nan_calls=(), spike_calls=()):
        super().__init__(config)
        self.calls, self.nan_calls, self.spike_calls, self.first_tokens = 0, set(nan_calls), set(spike_calls), []

    def train_step(self, state, local_batch):
        self.calls += 1
        batch = dict(local_batch)
        batch["loss_mask"] = np.asarray(batch["loss_mask"], np.float32) * (np.nan if self.calls in self.nan_calls
                                                                             else 1.0)
        self.first_tokens.append(np.asarray(local_batch["inputs"])[:, :4].tolist())
        state, metrics = super().train_step(state, batch)
        if self.calls in self.spike_calls:
            metrics = dict(metrics, loss=metrics["loss"] * 100.0)
        return state, metrics


def _config(tmp_path, *extra):
    return load_config(None, TINY + [f"train.run_dir={tmp_path / 'run'}", "optim.decay_steps=4", *extra])


def _finite(params) -> bool:
    flat, _ = flatten(params)
    return all(bool(np.isfinite(np.asarray(jax.device_get(v))).all()) for v in flat.values())


def test_skip_counts_and_never_applies_a_nonfinite_step(tmp_path):
    config = _config(tmp_path, "train.steps=5", "checkpoint.every=0", "train.on_nonfinite=skip")
    trainer = FaultyTrainer(config, nan_calls={3})
    seen = {}
    result = train(config, trainer=trainer, callback=lambda step, m: seen.update({step: dict(m)}))
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    assert np.isnan(seen[3]["loss"]) and seen[3]["nonfinite"] == 1.0
    assert seen[2]["nonfinite_skipped"] == 0.0 and seen[5]["nonfinite_skipped"] == 1.0
    assert np.isfinite(seen[4]["loss"]) and np.isfinite(seen[5]["loss"])
    assert _finite(result.state.params)
    assert int(result.state.step) == 5  # the step counter advances, so data and schedule stay aligned


def test_stop_exits_with_a_clear_error_and_the_last_good_checkpoint_intact(tmp_path):
    config = _config(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.async_save=false")
    with pytest.raises(NumericalError, match=r"non-finite loss or gradient at step 3 .*the last good checkpoint "
                                             r".*/checkpoints/2 is intact"):
        train(config, trainer=FaultyTrainer(config, nan_calls={3}))
    directory = os.path.join(tmp_path, "run", "checkpoints")
    assert finalized_steps(directory) == [2]
    # The checkpoint restores with its checksums verified (no partial or poisoned state was written).
    restored = CheckpointManager(directory, read_only=True).restore_arrays()
    assert restored.step == 2 and all(np.isfinite(v).all() for v in restored.state.values())


def test_spike_rolls_back_to_the_checkpoint_and_skips_its_batches(tmp_path):
    config = _config(tmp_path, "train.steps=8", "checkpoint.every=2", "checkpoint.async_save=false",
                     "train.spike_factor=3", "train.spike_window=2", "train.on_spike=rollback")
    trainer = FaultyTrainer(config, spike_calls={6})
    result = train(config, trainer=trainer)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert result.history[5]["rollbacks"] == 0.0 and result.history[5]["spikes"] == 1.0
    assert result.history[-1]["rollbacks"] == 1.0
    assert int(result.state.step) == 8
    # The data iterator was not rewound: 10 calls consumed the first 10 batches of the run, none twice.
    fresh = Trainer(config).train_iterator()
    expected = [np.asarray(next(fresh)["inputs"])[:, :4].tolist() for _ in range(10)]
    assert trainer.first_tokens == expected


def test_a_preemption_at_a_spike_exits_at_once_with_the_last_good_checkpoint(tmp_path, capsys):
    """The rollback used to come first: the run went back to its checkpoint and retrained before it saved and
    exited, time a preempted job may not have."""
    import signal

    config = _config(tmp_path, "train.steps=8", "checkpoint.every=2", "checkpoint.async_save=false",
                     "train.spike_factor=3", "train.spike_window=2", "train.on_spike=rollback")
    trainer = FaultyTrainer(config, spike_calls={6})
    preempt_at_6 = lambda step, metrics: step == 6 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    result = train(config, trainer=trainer, callback=preempt_at_6)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert finalized_steps(os.path.join(tmp_path, "run", "checkpoints")) == [2, 4]
    assert "preempted at a loss spike (step 6): not saved" in capsys.readouterr().out


def test_rollbacks_are_capped(tmp_path):
    config = _config(tmp_path, "train.steps=8", "checkpoint.every=2", "checkpoint.async_save=false",
                     "train.spike_factor=3", "train.spike_window=2", "train.on_spike=rollback",
                     "train.max_rollbacks=0")
    with pytest.raises(NumericalError, match=r"loss spike at step 6 after 0 rollback\(s\) \(train.max_rollbacks=0\)"):
        train(config, trainer=FaultyTrainer(config, spike_calls={6}))


@pytest.mark.parametrize("override, key", [("train.on_nonfinite=ignore", "train.on_nonfinite"),
                                           ("train.on_spike=restart", "train.on_spike"),
                                           ("train.spike_factor=0.5", "train.spike_factor")])
def test_guard_config_is_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_a_step_without_the_device_guard_still_stops_on_a_nonfinite_loss(tmp_path):
    """Step functions of their own (e.g. DPO's) report no `nonfinite` flag: the logged loss is checked instead."""

    class Unguarded(FaultyTrainer):
        def train_step(self, state, local_batch):
            state, metrics = super().train_step(state, local_batch)
            return state, {k: v for k, v in metrics.items() if k != "nonfinite"}

    config = _config(tmp_path, "train.steps=4", "checkpoint.every=0")
    with pytest.raises(NumericalError, match=r"non-finite loss nan at step 2; .*no on-device guard"):
        train(config, trainer=Unguarded(config, nan_calls={2}))
