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
    assert trace_summary.categorize("rms_norm_backward_triton") == "Triton (jax-triton)"
    assert trace_summary.categorize("swiglu_backward_triton") == "Triton (jax-triton)"
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


_HLO = """HloModule jit_train_step, entry_computation_layout={()->()}

ENTRY %main.1 () -> f32[] {
  %input_concatenate_fusion.27 = bf16[16384,2,8192]{2,1,0} fusion(%a, %b), kind=kInput, calls=%fused_concatenate.27, metadata={op_name="jit(train_step)/transpose(jvp())/checkpoint/stack" scheduling_name="input_concatenate_fusion.27"}
  %input_concatenate_fusion.26 = bf16[16384,2,8192]{2,1,0} fusion(%c, %d), kind=kInput, calls=%fused_concatenate.26, metadata={op_name="jit(train_step)/transpose(jvp())/checkpoint/stack" scheduling_name="input_concatenate_fusion.26"}
  %loop_convert_fusion = (f32[16384,8192]{1,0}, bf16[16384,8192]{1,0}) fusion(%e), kind=kLoop, calls=%fused_convert, metadata={op_name="jit(train_step)/transpose(jvp())/checkpoint/div"}
  ROOT %custom-call.1 = bf16[16384,8192]{1,0} custom-call(%f, %g), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/dot_general"}
}
"""


def test_hlo_dump_groups_the_same_fusion_of_every_layer(tmp_path, capsys):
    """Unrolled layers give each layer's fusion its own name in the trace; with the optimized HLO dump beside it,
    the summary adds them up by jax operation and shape, and leaves matmuls out of that list."""
    import gzip

    (tmp_path / "hlo").mkdir()
    (tmp_path / "hlo" / "module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations.txt").write_text(_HLO)
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "ts": 0, "dur": 500, "name": "input_concatenate_fusion_27",
         "args": {"hlo_op": "input_concatenate_fusion.27"}},
        {"ph": "X", "pid": 1, "ts": 500, "dur": 700, "name": "input_concatenate_fusion_26",
         "args": {"hlo_op": "input_concatenate_fusion.26"}},
        {"ph": "X", "pid": 1, "ts": 1200, "dur": 300, "name": "loop_convert_fusion",
         "args": {"hlo_op": "loop_convert_fusion"}},
        {"ph": "X", "pid": 1, "ts": 1500, "dur": 5000, "name": "nvjet_gemm", "args": {"hlo_op": "custom-call.1"}},
        {"ph": "X", "pid": 1, "ts": 6500, "dur": 100, "name": "loop_add_fusion", "args": {"hlo_op": "fusion.99"}},
    ]
    trace = tmp_path / "trace" / "plugins" / "profile"
    trace.mkdir(parents=True)
    with gzip.open(trace / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert trace_summary.main([str(tmp_path / "trace"), "--hlo", str(tmp_path / "hlo")]) == 0
    out = capsys.readouterr().out.split("non-matmul time by source")[1].splitlines()[1:]
    assert len(out) == 3  # both concatenates in one row, the convert, the op missing from the dump; no matmul
    ms, _, calls, *_ = out[0].split()
    assert float(ms) == pytest.approx(1.2) and calls == "x2"
    assert "bf16[16384,2,8192]" in out[0] and "checkpoint/stack" in out[0]
    assert "(f32[16384,8192], bf16[16384,8192])" in out[1] and "checkpoint/div" in out[1]
    assert "(not in the HLO dump)" in out[2]


def test_hlo_names_shared_by_several_programs_come_from_the_traced_one(tmp_path):
    """The dump holds every program the process compiled, and they reuse fusion names: the module that holds most
    of the traced kernels is the one a shared name is read from, whichever file comes last."""
    init = """HloModule jit_init, entry_computation_layout={()->()}

ENTRY %main.1 () -> u32[] {
  %loop_convert_fusion = u32[3072,2,8192]{2,1,0} fusion(%a), kind=kLoop, calls=%f, metadata={op_name="jit(init)/iota"}
}
"""
    (tmp_path / "module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations.txt").write_text(_HLO)
    (tmp_path / "module_0009.jit_init.sm_9.0a_gpu_after_optimizations.txt").write_text(init)
    traced = ["loop_convert_fusion", "input_concatenate_fusion.27", "custom-call.1"]
    assert "checkpoint/div" in trace_summary.hlo_sources(str(tmp_path), traced)["loop_convert_fusion"][1]
    assert "jit(init)" in trace_summary.hlo_sources(str(tmp_path), ["loop_convert_fusion"])["loop_convert_fusion"][1]


def test_hlo_dump_dir_without_a_dump_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no \\*after_optimizations.txt"):
        trace_summary.hlo_sources(str(tmp_path))


def test_collectives_exposed_and_compute_idle_per_device():
    """Two GPUs: GPU 0's all-gather runs 2 ms, 1 of them beside a GEMM on another stream; GPU 1's reduce-scatter
    runs alone. Collectives per device (2 + 1) / 2 = 1.5 ms, exposed (1 + 1) / 2 = 1 ms; the span is 6 ms, GPU 0
    computes for 5 of it (two GEMMs, overlapping ones counted once), GPU 1 for 3: idle (1 + 3) / 2 = 2 ms."""
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:1"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 2000, "name": "ncclDevKernel_AllGather_RING_LL"},
        {"ph": "X", "pid": 1, "tid": 8, "ts": 1000, "dur": 3000, "name": "nvjet_gemm"},
        {"ph": "X", "pid": 1, "tid": 9, "ts": 2000, "dur": 1000, "name": "loop_add_fusion"},
        {"ph": "X", "pid": 1, "tid": 8, "ts": 4000, "dur": 2000, "name": "nvjet_gemm"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 1000, "name": "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL"},
        {"ph": "X", "pid": 2, "tid": 8, "ts": 1000, "dur": 3000, "name": "nvjet_gemm"},
    ]
    s = trace_summary.summarize(events, steps=1)
    assert s["devices"] == 2
    assert trace_summary.categorize("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL") == "collective (NCCL)"
    assert s["categories"]["collective (NCCL)"]["ms"] == pytest.approx(3.0)
    d = s["per_device"]
    assert d["collective_ms"] == pytest.approx(1.5)
    assert d["exposed_collective_ms"] == pytest.approx(1.0)
    assert d["compute_idle_ms"] == pytest.approx(2.0)
    assert "1.0 ms of them exposed" in trace_summary.format_summary(s)


def test_a_cut_off_or_foreign_trace_is_one_line_error(tmp_path, capsys):
    import gzip

    from litespark_jax.cli import run_main

    whole = gzip.compress(json.dumps({"traceEvents": []}).encode())
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "perfetto_trace.json.gz").write_bytes(whole[: len(whole) // 2])  # still being written
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "perfetto_trace.json.gz").write_bytes(gzip.compress(b'{"events": []}'))
    for name, message in (("cut", "not a readable perfetto JSON trace"), ("foreign", "no traceEvents")):
        assert run_main(trace_summary.main, [str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
