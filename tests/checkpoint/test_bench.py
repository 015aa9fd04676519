"""The save benchmark runs end to end on a tiny model and reports consistent numbers."""

import json

from litespark_jax.checkpoint.bench import main
from litespark_jax.config import load_config
from tests.checkpoint.conftest import TINY


def test_bench_reports_throughput_and_stall(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--steps", "2", "--dir", str(tmp_path), "--json", str(out), *TINY, "train.steps=10"]) == 0
    result = json.loads(out.read_text())
    state_gb = result["state_gb"]
    params = load_config(None, TINY).model.num_params()
    assert abs(state_gb * 1e9 - (3 * params * 4 + 4 + 4)) < 1e3  # params + 2 Adam moments (f32) + counters
    assert result["sync_save_gb_per_s"] > 0 and result["async_save_gb_per_s"] > 0
    assert result["async_save_blocking_seconds"] <= result["async_save_finalized_seconds"]
    assert result["async_overlapped_steps"] >= 1
    assert list(tmp_path.iterdir()) == [out]  # checkpoints removed
    assert "training stall per async save" in capsys.readouterr().out
