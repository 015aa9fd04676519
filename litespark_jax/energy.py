"""GPU energy from NVML's cumulative energy counter (millijoules since driver load), and the SM clock with the reasons
NVML gives for holding it down, read through ctypes.

No Python NVML package is needed: ``libnvidia-ml.so.1`` ships with the driver. Where it is missing (CPU machines)
``EnergyMeter.available`` is False and readings are None.

Why the clock: an H100 SXM drawing its 700 W limit lowers its SM clock (measured on the 3B step: ~1440 MHz instead
of up to 1980, the software power cap active the whole time; docs/PERFORMANCE.md), so the same kernels give
different TFLOP/s on cards, days and workloads that differ in power. MFU against the nominal peak (989 TFLOP/s,
stated at 1830 MHz) hides that; the bench prints the median clock and the capped share beside it.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time

NVML_CLOCK_SM = 1
# nvmlClocksEventReasons bits that mean "held down for power": the software power cap and the hardware power brake.
POWER_CAP_REASONS = 0x4 | 0x80


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

    def clocks(self) -> list[tuple[int, bool]] | None:
        """(SM clock in MHz, held down by a power limit) for each local GPU now, or None without NVML."""
        if not self.available:
            return None
        reasons_fn = getattr(self._lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            self._lib, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        out = []
        for handle in self._handles:
            mhz, reasons = ctypes.c_uint(), ctypes.c_ulonglong()
            if self._lib.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM, ctypes.byref(mhz)) != 0:
                return None
            capped = reasons_fn is not None and reasons_fn(handle, ctypes.byref(reasons)) == 0 and bool(
                reasons.value & POWER_CAP_REASONS)
            out.append((mhz.value, capped))
        return out


class ClockSampler:
    """The SM clock over a window of wall time, sampled every ``interval_s`` in a background thread: ``start()``, then
    ``stop() -> (median MHz, fraction of samples held down by a power limit)`` over all GPUs and samples, or
    ``(None, None)`` without NVML. ``read`` (tests) replaces ``EnergyMeter.clocks``."""

    def __init__(self, meter: EnergyMeter | None = None, interval_s: float = 0.1, read=None):
        self._read = read or (meter or EnergyMeter()).clocks
        self.interval_s = interval_s
        self._samples: list[tuple[int, bool]] = []
        self._stop = threading.Event()
        self._thread = None

    def _run(self) -> None:
        while True:
            sample = self._read()
            if sample:
                self._samples.extend(sample)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self.stop()  # a window still open is dropped
        if self._read() is None:  # no NVML: nothing to sample
            return
        self._samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, name="clock-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> tuple[float | None, float | None]:
        if self._thread is None:
            return None, None
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self._samples:
            return None, None
        return (statistics.median(mhz for mhz, _ in self._samples),
                sum(capped for _, capped in self._samples) / len(self._samples))


class EnergyWindow:
    """Energy and average power over a window of wall time: ``start()``, then ``stop() -> (joules, watts)``. With
    ``clock_interval_s`` the window also samples the SM clock (``ClockSampler``); ``stop()`` then sets
    ``sm_clock_mhz`` and ``power_capped`` (None without NVML), after reading the energy counter, so the sampler's
    last interval is not counted as part of the window."""

    def __init__(self, meter: EnergyMeter | None = None, clock_interval_s: float | None = None):
        self.meter = meter or EnergyMeter()
        self._clocks = ClockSampler(self.meter, clock_interval_s) if clock_interval_s else None
        self._t0 = self._e0 = None
        self.sm_clock_mhz = self.power_capped = None

    def start(self) -> None:
        self._t0, self._e0 = time.perf_counter(), self.meter.read()
        if self._clocks is not None:
            self._clocks.start()

    def stop(self) -> tuple[float | None, float | None]:
        e1, t1 = self.meter.read(), time.perf_counter()
        if self._clocks is not None:
            self.sm_clock_mhz, self.power_capped = self._clocks.stop()
        if e1 is None or self._e0 is None:
            return None, None
        joules = e1 - self._e0
        return joules, joules / max(t1 - self._t0, 1e-9)
