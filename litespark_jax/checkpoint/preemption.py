"""Preemption: the first SIGTERM or SIGINT asks the loop to finish its step, save and exit 0; a second aborts.

The handler only sets a flag (signal handlers run between Python bytecodes of the main thread, so doing real work
in them would race with the step). The loop polls ``requested`` between steps. A second signal means "stop now":
it exits at once with 128 + the signal number, without saving; the last finalized checkpoint is untouched because
orbax only ever renames complete step directories into place.

On several processes a local flag is not enough: a signal that reaches one process (a node evicted alone) or
reaches them at different steps made one process save and leave while the others waited in the next step's
collectives. There JAX's preemption service (``jax_preemption_service``) keeps SIGTERM: it tells every process and
they agree on the step to save at (``multihost_utils.reached_preemption_sync_point``); SIGINT is handed to it as a
SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("litespark_jax")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def jax_preemption_service() -> bool:
    """Whether JAX's multi-process preemption service runs (``jax.distributed`` with the default
    ``jax_enable_preemption_service``): it catches SIGTERM itself and agrees on a step with every process."""
    import jax

    if jax.process_count() == 1:
        return False
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionHandler:
    """Context manager installing the handlers (main thread only; elsewhere it is a no-op that never fires).

    ``agreed``: JAX's preemption service decides when to stop (several processes): SIGTERM is left to it, and a
    first SIGINT is passed on to it as a SIGTERM."""

    def __init__(self, signals=SIGNALS, agreed: bool = False):
        self.signals = tuple(s for s in signals if not (agreed and s == signal.SIGTERM))
        self.agreed = agreed
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, saving a checkpoint and "
                  f"exiting (send it again to abort without saving)", file=sys.stderr, flush=True)
            if self.agreed:  # every process saves at the step the service agrees on
                os.kill(os.getpid(), signal.SIGTERM)
            return
        print(f"\nreceived {signal.Signals(signum).name} again: aborting without saving", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False
