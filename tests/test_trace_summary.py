"""The profile summary, on a real trace of a CPU training step (bench --profile) and on hand-made events."""

import json

import pytest

from litespark_jax import bench, trace_summary
from litespark_jax.errors import UserError


def test_categories_of_known_kernel_names():
    assert trace_summary.categorize("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert trace_summary.categorize("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert trace_summary.categorize("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention (cuDNN)"
    assert trace_summary.categorize("loop_multiply_fusion_3") == "elementwise fusion"
    assert trace_summary.categorize("input_reduce_fusion_1") == "reduction fusion"
    assert trace_summary.categorize("something_else") == "other"


def test_summary_sums_gpu_kernels_per_step_and_ignores_host_events():
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "ts": 0, "dur": 1, "name": "memset32", "args": {"hlo_op": "dot.1"}},
        {"ph": "X", "pid": 1, "ts": 0, "dur": 2999, "name": "nvjet_gemm", "args": {"hlo_op": "dot.1"}},
        {"ph": "X", "pid": 1, "ts": 3000, "dur": 1000, "name": "loop_add_fusion", "args": {"hlo_op": "fusion.2"}},
        {"ph": "X", "pid": 1, "ts": 4000, "dur": 3000, "name": "nvjet_gemm", "args": {"hlo_op": "dot.1"}},
        {"ph": "X", "pid": 1, "ts": 9000, "dur": 1000, "name": "loop_add_fusion", "args": {"hlo_op": "fusion.2"}},
        {"ph": "X", "pid": 2, "ts": 0, "dur": 99000, "name": "PjitFunction(step)"},
    ]
    s = trace_summary.summarize(events, steps=2)
    assert s["source"] == "gpu"
    assert s["busy_ms_per_step"] == pytest.approx(4.0)
    assert s["span_ms_per_step"] == pytest.approx(5.0)
    assert s["categories"]["matmul"]["ms"] == pytest.approx(2.9995)
    assert s["categories"]["matmul"]["share"] == pytest.approx(2.9995 / 4.0)
    assert s["categories"]["copy / memset"]["ms"] == pytest.approx(0.0005)
    assert [o["op"] for o in s["top_ops"]] == ["dot.1", "fusion.2"]
    assert s["top_ops"][0]["ms"] == pytest.approx(3.0)
    assert s["top_ops"][0]["category"] == "matmul"  # its GEMM, not the memset launched first


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no perfetto_trace.json.gz"):
        trace_summary.find_trace(str(tmp_path))


def test_bench_profile_writes_a_summary_of_a_real_step(tmp_path, capsys):
    rc = bench.main(["--config", "configs/tiny.yaml", "--steps", "1", "--warmup", "0", "--profile", str(tmp_path),
                     "train.seq_len=32", "train.global_batch_size=2", "model.num_layers=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# litespark: profile" in out and "device time per step" in out
    summary = json.loads((tmp_path / "litespark" / "summary.json").read_text())
    assert summary["source"] == "cpu" and summary["steps"] == bench.PROFILED_STEPS
    assert summary["busy_ms_per_step"] > 0
    assert sum(c["share"] for c in summary["categories"].values()) == pytest.approx(1.0)
