"""The end-to-end bench on the CPU: the loss-curve comparison runs the real loop for both variants."""

import json

import pytest

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


def test_curve_noise_reruns_the_baseline_and_judges_each_gap_against_it(tmp_path, capsys):
    jsonl = tmp_path / "curves.jsonl"
    rc = bench.main(["--config", "configs/tiny.yaml", "--baseline", "--curve-steps", "4", "--curve-noise",
                     "--jsonl", str(jsonl), "--curve-dir", str(tmp_path / "runs"), "train.seq_len=64",
                     "model.num_layers=1"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {r["variant"]: r["curve"] for r in map(json.loads, jsonl.read_text().splitlines())}
    assert list(rows) == ["litespark", "baseline", "baseline-rerun"]
    assert rows["baseline-rerun"] == rows["baseline"]  # the CPU is deterministic: a zero noise floor
    assert "baseline-rerun - baseline: final +0.0000" in out and "(the noise floor)" in out
    gap = abs(rows["litespark"][-1] - rows["baseline"][-1])
    assert ("-> within max(0.02, noise 0.0000)" in out) == (gap <= 0.02)


def test_curve_noise_without_a_curve_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "configs/tiny.yaml", "--curve-noise"])
    assert e.value.code == 2
    assert "--curve-noise needs --curve-steps N and --baseline" in capsys.readouterr().err


def test_split_top_level_keeps_lists_and_mappings_whole():
    text = "a=1,b=[x, y],c={k: v, w: [1, 2]},d=2"
    assert bench.split_top_level(text) == ["a=1", "b=[x, y]", "c={k: v, w: [1, 2]}", "d=2"]


def test_variants_with_their_own_xla_options_are_timed_in_one_process(capsys):
    rc = bench.main(["--config", "configs/tiny.yaml", "--steps", "1", "--warmup", "0", "--variant",
                     "exact:train.xla_options={xla_cpu_enable_fast_math: false, xla_cpu_fast_math_honor_nans: true}",
                     "train.seq_len=64", "model.num_layers=1", "train.global_batch_size=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# exact: " in out and "xla_options={'xla_cpu_enable_fast_math': False" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("litespark ", "exact "))] == \
        ["litespark", "exact"]
