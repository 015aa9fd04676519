"""NVML energy: which GPUs are metered, and that CPU machines read None rather than failing."""

from litespark_jax import energy


def test_visible_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert energy._visible_indices(4) == [0, 1, 2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert energy._visible_indices(4) == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7")  # an index NVML does not have is ignored
    assert energy._visible_indices(4) == [1]


def test_window_without_nvml_reads_none():
    meter = energy.EnergyMeter()
    if meter.available:  # a GPU machine: the counter is monotonic
        first = meter.read()
        assert meter.read() >= first
        return
    window = energy.EnergyWindow(meter)
    window.start()
    assert window.stop() == (None, None)


def test_clock_sampler_reports_the_median_clock_and_the_power_capped_share():
    """Two GPUs sampled in a background thread until ``stop`` (fake NVML readings): the median clock over all samples
    and the share held down by a power limit. ``start`` probes once (an idle clock, not a sample)."""
    import threading

    calls, enough = [], threading.Event()

    def read():
        calls.append(1)
        if len(calls) >= 6:
            enough.set()
        if len(calls) == 1:
            return [(1980, False), (1980, False)]
        return [(1440, True), (1500, False)]  # GPU 0 power-capped, GPU 1 not

    sampler = energy.ClockSampler(read=read, interval_s=0.001)
    sampler.start()
    assert enough.wait(5)
    mhz, capped = sampler.stop()
    assert (mhz, capped) == (1470, 0.5)
    assert sampler.stop() == (None, None)  # nothing left running


def test_clock_sampler_without_nvml_reads_none():
    sampler = energy.ClockSampler(read=lambda: None)
    sampler.start()
    assert sampler.stop() == (None, None)


def test_energy_window_reads_the_clock_sampler_it_starts(monkeypatch):
    """``EnergyWindow(clock_interval_s=...)`` starts a ``ClockSampler`` with the window and keeps its result."""
    calls = []

    class Sampler:
        def __init__(self, meter, interval_s):
            calls.append(("init", interval_s))

        def start(self):
            calls.append("start")

        def stop(self):
            calls.append("stop")
            return 1455.0, 1.0

    monkeypatch.setattr(energy, "ClockSampler", Sampler)
    window = energy.EnergyWindow(clock_interval_s=0.25)
    window.start()
    window.stop()
    assert calls == [("init", 0.25), "start", "stop"]
    assert (window.sm_clock_mhz, window.power_capped) == (1455.0, 1.0)
    assert energy.EnergyWindow().sm_clock_mhz is None  # no sampler unless asked for
