"""The training log carries the SM clock and the power-capped share next to power and energy (where NVML reads)."""

import json

from litespark_jax import energy
from litespark_jax.config import load_config
from litespark_jax.train import loop

SMALL = ["model.num_layers=2", "train.seq_len=64", "train.global_batch_size=2", "train.eval_every=0",
         "log.progress_bar=false", "log.tensorboard=false", "checkpoint.every=0", "log.every=2", "train.steps=4"]


class FakeClocks:
    """Stands in for NVML: every window reads 1440 MHz, power-capped 3 samples in 4."""

    def __init__(self, *_, **__):
        self.open = False

    def start(self):
        self.open = True

    def stop(self):
        was_open, self.open = self.open, False
        return (1440.0, 0.75) if was_open else (None, None)


def test_log_lines_hold_the_clock_and_the_capped_share(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "ClockSampler", FakeClocks)  # the sampler EnergyWindow starts
    result = loop.train(load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={tmp_path}"]))
    logged = [h for h in result.history if "tokens_per_second" in h]
    assert logged and all(h["sm_clock_mhz"] == 1440.0 and h["power_capped"] == 0.75 for h in logged)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("sm_clock_mhz") == 1440.0 for r in rows)
    assert "1440 MHz (75% power-capped)" in loop._postfix(logged[-1])


def test_without_nvml_the_log_has_no_clock(tmp_path):
    result = loop.train(load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={tmp_path}"]))
    assert all("sm_clock_mhz" not in h for h in result.history)
