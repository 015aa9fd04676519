"""Numerical guards of the training loop: non-finite steps and loss spikes.

- Non-finite loss or gradient: the jitted step (``step.py``) never applies such an update and reports
  ``nonfinite`` (0/1). Here those flags are summed on the device, with no host sync per step, and read at log
  points and before saves: ``train.on_nonfinite=stop`` raises ``NumericalError`` naming the first bad step and the
  last good checkpoint; ``skip`` counts them (metric ``nonfinite_skipped``) and warns.
- Loss spikes: a logged loss above ``train.spike_factor`` x the mean of the previous ``train.spike_window`` logged
  losses. ``train.on_spike=ignore`` warns and counts (metric ``spikes``); ``rollback`` restores the newest
  checkpoint and keeps the data iterator where it is, so the batches consumed since that checkpoint (those that
  led to the spike) are skipped (metric ``rollbacks``); more than ``train.max_rollbacks`` rollbacks stop the run.
"""

from __future__ import annotations

import collections
import logging
import math

import jax.numpy as jnp

from litespark_jax.errors import NumericalError

log = logging.getLogger("litespark_jax")

_NO_BAD_STEP = 2 ** 31 - 1


class Guards:
    def __init__(self, train_cfg, checkpoints):
        self.cfg = train_cfg
        self.checkpoints = checkpoints
        self._bad_count = None  # device scalars, updated asynchronously each step
        self._first_bad = None
        self.nonfinite_skipped = 0
        self.spikes = 0
        self.rollbacks = 0
        self._window: collections.deque = collections.deque(maxlen=max(1, train_cfg.spike_window))

    # -- non-finite steps ----------------------------------------------------------------------------------------

    def observe(self, step: int, metrics: dict) -> None:
        """Fold this step's ``nonfinite`` flag into device-side counters (no host sync)."""
        bad = metrics.get("nonfinite")
        if bad is None:
            return
        if self._bad_count is None:
            self._bad_count, self._first_bad = jnp.zeros((), jnp.float32), jnp.full((), _NO_BAD_STEP, jnp.int32)
        self._bad_count = self._bad_count + bad
        self._first_bad = jnp.where(bad > 0, jnp.minimum(self._first_bad, step), self._first_bad)

    def check_nonfinite(self, step: int, metrics: dict | None = None) -> int:
        """Host check (at log points, before saves, at the end): stop or count. Returns the steps skipped so far.

        ``metrics``: the logged metrics of ``step``; for a step function without the on-device guard (no
        ``nonfinite`` flag, e.g. a custom one) a non-finite logged loss is the only sign, and its update was applied."""
        if metrics is not None and "nonfinite" not in metrics and not math.isfinite(metrics.get("loss", 0.0)):
            raise NumericalError(
                f"non-finite loss {metrics['loss']} at step {step}; training stopped (this step function has no "
                f"on-device guard, so the update was applied); {self._last_good()}")
        if self._bad_count is None:
            return self.nonfinite_skipped
        count, first = int(self._bad_count), int(self._first_bad)
        if not count:
            return self.nonfinite_skipped
        self._bad_count, self._first_bad = None, None
        if self.cfg.on_nonfinite == "stop":
            raise NumericalError(
                f"non-finite loss or gradient at step {first} ({count} such step(s) by step {step}); the update was "
                f"not applied and training stopped (train.on_nonfinite=stop); {self._last_good()}")
        self.nonfinite_skipped += count
        log.warning("warning: skipped %d step(s) with a non-finite loss or gradient (first at step %d); %d skipped "
                    "in total (train.on_nonfinite=skip)", count, first, self.nonfinite_skipped)
        return self.nonfinite_skipped

    def _last_good(self) -> str:
        try:
            self.checkpoints.manager.wait()
        except Exception:  # noqa: BLE001 - reporting only; the save error itself is raised elsewhere
            pass
        steps = self.checkpoints.manager.all_steps()
        if not steps:
            return f"no checkpoint was saved yet in {self.checkpoints.directory}"
        return f"the last good checkpoint {self.checkpoints.directory}/{steps[-1]} is intact"

    # -- loss spikes ---------------------------------------------------------------------------------------------

    def is_spike(self, step: int, loss: float) -> bool:
        """Test a logged loss against the window of previous logged losses (a spike is not added to the window)."""
        factor = self.cfg.spike_factor
        if not factor or loss != loss:
            return False
        full = len(self._window) == self._window.maxlen
        mean = sum(self._window) / len(self._window) if self._window else 0.0
        if full and loss > factor * mean:
            self.spikes += 1
            log.warning("warning: loss spike at step %d: %.4f > %g x %.4f (mean of the previous %d logged losses); "
                        "train.on_spike=%s", step, loss, factor, mean, len(self._window), self.cfg.on_spike)
            return True
        self._window.append(loss)
        return False

    def rollback(self, step: int, trainer):
        """Restore the newest checkpoint, keep the data iterator where it is (skipping the batches since that
        checkpoint). Returns (state, checkpoint step), or None when there is no checkpoint to roll back to."""
        manager = self.checkpoints.manager
        manager.wait()
        if not manager.all_steps():
            log.warning("warning: loss spike at step %d but no checkpoint to roll back to yet; continuing", step)
            return None
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise NumericalError(
                f"loss spike at step {step} after {self.rollbacks} rollback(s) (train.max_rollbacks="
                f"{self.cfg.max_rollbacks}); training stopped; {self._last_good()}")
        restored = trainer.restore_state(manager)
        manager.set_aside(restored.skipped)  # so the retrained steps can be saved under their numbers
        self.rollbacks += 1
        self._window.clear()
        self._bad_count, self._first_bad = None, None
        log.warning("warning: rolled back from step %d to checkpoint %s (step %d), skipping %d data batch(es); "
                    "rollback %d of at most %d", step, restored.path, restored.step, step - restored.step,
                    self.rollbacks, self.cfg.max_rollbacks)
        return restored.state, restored.step
