"""Preemption: the first SIGTERM or SIGINT asks the loop to finish its step, save and exit 0; a second aborts.

The handler only sets a flag (signal handlers run between Python bytecodes of the main thread, so doing real work
in them would race with the step). The loop polls ``requested`` between steps. A second signal means "stop now":
it exits at once with 128 + the signal number, without saving; the last finalized checkpoint is untouched because
orbax only ever renames complete step directories into place.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("litespark_jax")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Context manager installing the handlers (main thread only; elsewhere it is a no-op that never fires)."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
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
