"""A lock that survives pickling: grain sends data objects to worker processes, and locks do not pickle."""

from __future__ import annotations

import threading


class PicklableLock:
    """Gives ``self._lock``; a pickled copy drops it and the unpickled object makes a fresh one."""

    def __init__(self):
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
