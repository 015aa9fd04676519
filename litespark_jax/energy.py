"""GPU energy from NVML's cumulative energy counter (millijoules since driver load), read through ctypes.

No Python NVML package is needed: ``libnvidia-ml.so.1`` ships with the driver. Where it is missing (CPU machines)
``EnergyMeter.available`` is False and readings are None.
"""

from __future__ import annotations

import ctypes
import os
import time


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the GPUs in CUDA_VISIBLE_DEVICES (NVML itself ignores it); all of them when unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return list(range(count))
    indices = [int(v) for v in visible.split(",") if v.strip().isdigit()]
    return [i for i in indices if i < count] if indices else list(range(count))


class EnergyMeter:
    """Sums the energy counters of all local GPUs; ``read()`` returns joules since an arbitrary origin."""

    def __init__(self):
        self._lib = None
        self._handles = []
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            count = ctypes.c_uint()
            lib.nvmlDeviceGetCount_v2(ctypes.byref(count))
            for i in _visible_indices(count.value):
                handle = ctypes.c_void_p()
                if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) == 0:
                    self._handles.append(handle)
            self._lib = lib
        except OSError:
            self._lib = None

    @property
    def device_count(self) -> int:
        """GPUs whose energy is summed (those this process may use)."""
        return len(self._handles)

    @property
    def available(self) -> bool:
        return self._lib is not None and bool(self._handles)

    def read(self) -> float | None:
        """Total energy of all local GPUs in joules (monotonic), or None without NVML."""
        if not self.available:
            return None
        total = 0
        for handle in self._handles:
            millijoules = ctypes.c_ulonglong()
            if self._lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(millijoules)) != 0:
                return None
            total += millijoules.value
        return total / 1000.0


class EnergyWindow:
    """Energy and average power over a window of wall time: ``start()``, then ``stop() -> (joules, watts)``."""

    def __init__(self, meter: EnergyMeter | None = None):
        self.meter = meter or EnergyMeter()
        self._t0 = self._e0 = None

    def start(self) -> None:
        self._t0, self._e0 = time.perf_counter(), self.meter.read()

    def stop(self) -> tuple[float | None, float | None]:
        e1, t1 = self.meter.read(), time.perf_counter()
        if e1 is None or self._e0 is None:
            return None, None
        joules = e1 - self._e0
        return joules, joules / max(t1 - self._t0, 1e-9)
