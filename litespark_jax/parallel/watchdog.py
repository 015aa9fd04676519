"""A step watchdog: exit non-zero when no training step completes for too long (a hung collective).

A collective whose peer died or whose network link broke does not fail; it blocks forever, and the job burns its
allocation. The watchdog thread is armed by the first ``beat()`` (after the first step compiled) and, when no beat
arrives for ``timeout_s``, prints the last step, dumps every thread's stack and calls ``os._exit(EXIT_CODE)``, so
SLURM (``--requeue``) or the JobSet (``failurePolicy.maxRestarts``) restarts the job from the last checkpoint.

``LITESPARK_STEP_TIMEOUT_S`` sets the timeout (default 1800 s, generous enough for evaluation and checkpoint saves
between beats; 0 disables it).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_CODE = 75  # EX_TEMPFAIL: "try again", distinct from crashes (1) and bad input (2).
DEFAULT_TIMEOUT_S = 1800.0


def timeout_from_env(env=None) -> float:
    """``LITESPARK_STEP_TIMEOUT_S`` (seconds >= 0; 0 disables); a bad value is a one-line error naming it."""
    from litespark_jax.parallel.distributed import env_number

    return env_number(os.environ if env is None else env, "LITESPARK_STEP_TIMEOUT_S", DEFAULT_TIMEOUT_S)


class StepWatchdog:
    def __init__(self, timeout_s: float, *, exit_fn=None, poll_s: float | None = None):
        self.timeout_s = float(timeout_s)
        self._exit = exit_fn or os._exit
        self._poll = poll_s if poll_s is not None else max(0.05, min(10.0, self.timeout_s / 10))
        self._last = None
        self._step = 0
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def from_env(cls, env=None) -> "StepWatchdog":
        return cls(timeout_from_env(env))

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def beat(self, step: int | None = None) -> None:
        """A step completed (or was dispatched): restart the clock; the first beat starts the thread."""
        if not self.enabled:
            return
        self._last = time.monotonic()
        self._step = self._step + 1 if step is None else step
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="litespark-step-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(f"watchdog: no training step completed for {idle:.1f}s (limit {self.timeout_s:g}s, "
                      f"LITESPARK_STEP_TIMEOUT_S) after step {self._step}; a collective is probably hung (a peer "
                      f"died or the network failed). Exiting with code {EXIT_CODE} so the scheduler restarts the "
                      f"job from the last checkpoint.", file=sys.stderr, flush=True)
                try:
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                except Exception:  # noqa: BLE001
                    pass
                self._exit(EXIT_CODE)
                return
