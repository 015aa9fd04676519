"""The benchmark plot reads bench JSONL rows and draws one bar per (model, variant)."""

import json

from litespark_jax import bench_plot


def test_plot_draws_every_model_and_variant(tmp_path, capsys):
    rows = [{"config": f"configs/{m}.yaml", "variant": v, "tokens_per_s": t, "mfu_causal": u}
            for m, v, t, u in [("a", "litespark", 2.0e4, 0.4), ("a", "baseline", 1.5e4, 0.3),
                               ("b", "litespark", 5.0e4, 0.42), ("b", "baseline", 3.4e4, 0.29)]]
    results = tmp_path / "bench.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bench.png"
    assert bench_plot.main([str(results), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_missing_results_file_is_one_line_error(tmp_path, capsys):
    assert bench_plot.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_each_bar_is_its_own_presets_last_timed_row(tmp_path):
    rows = [{"config": "configs/tiny.yaml", "variant": "litespark", "tokens_per_s": 1000.0},
            {"config": "configs/sft-tiny.yaml", "variant": "litespark", "tokens_per_s": 50.0},  # ends in tiny.yaml
            {"config": "configs/tiny.yaml", "variant": "litespark", "curve": [1.0, 0.9]}]  # a loss-curve row
    results = tmp_path / "bench.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"config": "configs/tiny.yaml", "varia')
    values = bench_plot.bar_values(bench_plot.load_rows([str(results)]), "tokens_per_s")
    assert values == {("tiny", "litespark"): 1000.0, ("sft-tiny", "litespark"): 50.0}


def test_a_file_with_no_timed_rows_is_one_line_error(tmp_path, capsys):
    from litespark_jax.cli import run_main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_main(bench_plot.main, [str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {empty}: no timed rows (with config, variant and "
                                               "tokens_per_s) to plot")
