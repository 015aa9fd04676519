"""The end-to-end bench on the CPU: the loss-curve comparison runs the real loop for both variants."""

import json

import numpy as np
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


def test_a_curve_cut_short_stops_the_comparison_and_keeps_what_ran(monkeypatch, capsys):
    """A run that leaves early (the loop saves and exits on SIGTERM, e.g. a timeout) ends the curve runs, and the
    gaps are taken over the steps every variant ran instead of failing on the shorter curve."""
    import numpy as np

    from litespark_jax.train import loop

    lengths = iter([6, 4])

    class Result:
        def __init__(self, n):
            self.history = [{"loss": 5.0 - 0.1 * i} for i in range(n)]

    monkeypatch.setattr(loop, "train", lambda config: Result(next(lengths)))
    specs = [("litespark", []), ("baseline", []), ("baseline-rerun", [])]
    curves = bench.loss_curves("configs/tiny.yaml", specs, 6, "/tmp/unused")
    assert [len(c) for c in curves.values()] == [6, 4]  # the rerun never started
    assert "baseline: stopped after 4 of 6 steps" in capsys.readouterr().out
    assert bench.print_curves(curves) == 0.0
    out = capsys.readouterr().out
    assert "comparing the first 4 steps" in out and "litespark - baseline: final +0.0000" in out
    assert np.isclose(curves["litespark"][-1], 4.5)  # the caller's curves are left whole


def test_curve_noise_without_a_curve_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "configs/tiny.yaml", "--curve-noise"])
    assert e.value.code == 2
    assert "--curve-noise needs --curve-steps N and --baseline" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--warmup", "-1"], "--warmup -1: must be at least 0"),
    (["--curve-steps", "-3"], "--curve-steps -3: must be at least 0"),
    (["--docs", "0"], "--docs 0: must be at least 1"),
    (["--docs", "512", "--curve-steps", "5"], "--curve-steps trains on the configured data"),
    (["--variant", ":train.seed=3"], "a name is missing"),
    (["--variant", "baseline:train.seed=3"], "the name 'baseline' is taken"),
    (["--variant", "a:train.seed=3", "--variant", "a:train.seed=4"], "the name 'a' is taken"),
])
def test_bad_command_line_is_one_error_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "configs/tiny.yaml", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


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


def test_a_variant_with_another_batch_size_is_timed_on_a_batch_of_its_size(monkeypatch, capsys):
    """A variant may change the batch (e.g. to spend freed memory): it must get its own batch, else its tokens/s
    would count sequences it never ran (this happened on the H100: 'batch 6' timed the 4-sequence batch)."""
    seen = {}

    def fake_measure(name, config, batch, *args):
        seen[name] = batch["inputs"].shape
        return {"variant": name, "devices": 1, "tokens_per_s": 1.0, "tokens_per_s_per_device": 1.0,
                "tflops_per_device": 1.0, "mfu_causal": None,
                "mfu_noncausal": None, "step_s": 1.0, "compiled_memory_gib": None, "peak_memory_gib": None,
                "compile_s": 0.0, "avg_power_w": None, "joules_per_token": None, "final_loss": 0.0}

    monkeypatch.setattr(bench, "measure", fake_measure)
    assert bench.main(["--config", "configs/tiny.yaml", "--variant", "b3:train.global_batch_size=3",
                       "train.seq_len=64", "train.global_batch_size=2"]) == 0
    assert seen == {"litespark": (2, 64), "b3": (3, 64)}


def test_packed_batch_has_documents_of_the_asked_length_with_their_own_positions():
    config = bench.load_config("configs/tiny.yaml", ["train.seq_len=256", "train.global_batch_size=3"])
    plain = bench.synthetic_batch(config)
    batch = bench.synthetic_batch(config, mean_doc_len=40)
    assert "segment_ids" not in plain
    np.testing.assert_array_equal(batch["inputs"], plain["inputs"])  # the same tokens, only packed
    for seg, pos in zip(batch["segment_ids"], batch["positions"]):
        starts = np.flatnonzero(np.diff(seg, prepend=0))
        lengths = np.diff(np.append(starts, len(seg)))
        np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))  # 1, 2, ... in order
        assert ((lengths[:-1] >= 20) & (lengths[:-1] <= 60)).all() and 1 <= lengths[-1] <= 60
        assert len(starts) >= 4
        np.testing.assert_array_equal(pos, np.concatenate([np.arange(n) for n in lengths]))


def test_docs_flag_times_every_variant_on_the_packed_batch_and_records_it(monkeypatch, tmp_path):
    seen = {}

    def fake_measure(name, config, batch, *args):
        seen[name] = int(batch["segment_ids"].max())
        return {"variant": name, "devices": 1, "tokens_per_s": 1.0, "tokens_per_s_per_device": 1.0,
                "tflops_per_device": 1.0, "mfu_causal": None, "mfu_noncausal": None, "step_s": 1.0,
                "compiled_memory_gib": None, "peak_memory_gib": None, "compile_s": 0.0, "avg_power_w": None,
                "joules_per_token": None, "final_loss": 0.0}

    monkeypatch.setattr(bench, "measure", fake_measure)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--config", "configs/tiny.yaml", "--docs", "16", "--baseline", "--jsonl", str(out),
                       "train.seq_len=64", "train.global_batch_size=2"]) == 0
    assert set(seen) == {"litespark", "baseline"} and min(seen.values()) >= 3
    assert [json.loads(line)["mean_doc_len"] for line in out.read_text().splitlines()] == [16, 16]


def test_measure_refuses_a_batch_of_another_shape():
    config = bench.load_config("configs/tiny.yaml", ["train.seq_len=64", "train.global_batch_size=3"])
    batch = bench.synthetic_batch(bench.load_config("configs/tiny.yaml", ["train.seq_len=64",
                                                                           "train.global_batch_size=2"]))
    with pytest.raises(ValueError, match="not the config's 3 x 64"):
        bench.measure("b3", config, batch, steps=1, warmup=0)


def test_weak_scaling_script_runs_the_same_per_device_batch_over_an_fsdp_mesh(tmp_path):
    """launch/bench_weak_scaling.sh on 2 CPU devices: LiteSpark and the baseline each get N x their per-GPU batch
    on an FSDP-N mesh, and the rows report tokens/s per device (the weak-scaling figure)."""
    import os
    import subprocess

    out = tmp_path / "ws.jsonl"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               OUT=str(out), CONFIG="configs/tiny.yaml", PER_GPU="3", BASE_PER_GPU="2", STEPS="1")
    proc = subprocess.run(["bash", "launch/bench_weak_scaling.sh", "2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"litespark", "baseline"}
    for name, per_gpu in (("litespark", 3), ("baseline", 2)):
        r = rows[name]
        assert r["devices"] == 2 and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1, "context": 1}
        assert r["global_batch"] == 2 * per_gpu
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
    assert "tok/s/GPU" in proc.stdout


def test_baseline_attention_is_cudnn_only_where_cudnn_takes_the_model(monkeypatch):
    """On a GPU the baseline's attention is cuDNN's, except for a model cuDNN rejects (float32: the tiny preset),
    which gets XLA's attention instead of a baseline that raises; on CPU always XLA's."""
    from litespark_jax.config import load_config

    tiny, bf16 = (load_config("configs/tiny.yaml", extra).model for extra in ([], ["model.dtype=bfloat16"]))
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "cpu")
    assert "model.attention_impl=reference" in bench.baseline_overrides(bf16)
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    assert "model.attention_impl=cudnn" in bench.baseline_overrides(bf16)
    assert "model.attention_impl=reference" in bench.baseline_overrides(tiny)
    assert "model.attention_impl=cudnn" in bench.baseline_overrides(bf16, 256)
    assert "model.attention_impl=reference" in bench.baseline_overrides(bf16, 255)  # cuDNN's backward: even only
