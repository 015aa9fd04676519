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
