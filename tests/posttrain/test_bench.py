"""``python -m litespark_jax.posttrain.bench``: one timed SFT step on the CPU prints its row, clock fields included."""

import json

import pytest

from litespark_jax.energy import EnergyMeter
from litespark_jax.posttrain import bench

pytestmark = pytest.mark.optimized_xla  # a step of the SFT preset's model: running it costs more than compiling it
no_nvml = pytest.mark.skipif(EnergyMeter().available, reason="checks the rows of a machine without NVML")


def test_sft_row_has_throughput_energy_and_clock_fields(capsys):
    assert bench.main(["--kind", "sft", "--steps", "1", "--warmup", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["kind"] == "sft" and row["tokens_per_second"] > 0 and row["steps"] == 1
    assert {"joules_per_token", "sm_clock_mhz", "power_capped_frac"} <= row.keys()
    if not EnergyMeter().available:  # a CPU machine: energy and clock read None rather than failing
        assert row["sm_clock_mhz"] is None and row["power_capped_frac"] is None


@no_nvml
def test_table_prints_dashes_without_nvml(capsys):
    assert bench.main(["--kind", "sft", "--steps", "1", "--warmup", "1"]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split()[-2:] == ["MHz", "capped"] and line.split()[-2:] == ["-", "-"]
