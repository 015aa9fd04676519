"""The end-to-end bench on the CPU: the loss-curve comparison runs the real loop for both variants."""

import json

from litespark_jax import bench


def test_curve_steps_trains_both_variants_on_the_corpus_and_reports_the_gap(tmp_path, capsys):
    jsonl = tmp_path / "curves.jsonl"
    rc = bench.main(["--config", "configs/tiny.yaml", "--baseline", "--curve-steps", "12", "--jsonl", str(jsonl),
                     "--curve-dir", str(tmp_path / "runs"), "train.seq_len=64", "model.num_layers=2",
                     "model.dtype=bfloat16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "litespark - baseline: final" in out
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["litespark", "baseline"]
    lit, base = (r["curve"] for r in rows)
    assert len(lit) == len(base) == 12
    assert lit[0] == base[0]  # same seed, same first batch, same initial loss
    assert base[-1] < base[0] - 1.0  # both learned
    assert abs(lit[-1] - base[-1]) < 0.02
    assert (tmp_path / "runs" / "litespark" / "metrics.jsonl").exists()
