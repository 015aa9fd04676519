"""The kernel benchmarks' timing helpers and the attention bench's rows, on the CPU at a tiny shape."""

import time
import types

import jax.numpy as jnp
import pytest

from pallas_kernels.bench import attention as attention_bench
from pallas_kernels.bench.mlp import stream_ms, time_ms


def _sleeper(seconds, calls):
    def fn(x):
        calls.append(1)
        time.sleep(seconds)
        return x + 1
    return fn


def test_stream_ms_times_the_difference_of_two_batches():
    calls = []
    ms = stream_ms(_sleeper(0.01, calls), jnp.zeros(3), calls=4, warmup=2)
    assert len(calls) == 2 + 4 + 8
    assert 8.0 <= ms < 100.0  # 10 ms per call (a difference of two timings: allow the clock's jitter)


def test_time_ms_is_the_median_per_call():
    calls = []
    ms = time_ms(_sleeper(0.005, calls), jnp.zeros(3), iters=3, warmup=1)
    assert len(calls) == 4
    assert 5.0 <= ms < 100.0


def test_attention_bench_rows_have_both_timings_and_small_errors(monkeypatch):
    monkeypatch.setattr(attention_bench, "SHAPES", [("tiny", 1, 128, 4, 2, 64, True, "docs")])
    monkeypatch.setenv("ATTN_BENCH_IMPLS", "reference")
    monkeypatch.setenv("ATTN_BENCH_SHAPES", "tiny")
    rows = attention_bench.run(types.SimpleNamespace(quick=True))
    assert len(rows) == 1
    row = rows[0]
    assert "error" not in row, row
    for key in ("fwd_ms", "fwdbwd_ms", "fwd_stream_ms", "fwdbwd_stream_ms"):
        assert row[key] > 0, key
    # The bf16 reference against the float32 one: bf16 rounding, not a wrong answer.
    for key in ("err_out", "err_dq", "err_dk", "err_dv"):
        assert float(row[key]) < 2e-2, (key, row[key])


def test_call_timeline_describes_the_middle_call():
    from pallas_kernels.bench.attention_timeline import call_timeline

    # Three calls of two kernels each: a 100 us kernel, a 10 us gap, a 50 us kernel; 40 us between calls.
    events = []
    for c in range(3):
        t0 = c * 200.0
        events += [{"name": "fwd", "ts": t0, "dur": 100.0}, {"name": "bwd", "ts": t0 + 110.0, "dur": 50.0}]
    t = call_timeline(events[::-1], calls=3)
    assert [r[0] for r in t["kernels"]] == ["fwd", "bwd"]
    assert t["kernels"][0] == ("fwd", 0.0, 100.0, 40.0)
    assert t["kernels"][1] == ("bwd", 110.0, 50.0, 10.0)
    assert t["busy_us"] == 150.0 and t["idle_us"] == 50.0
    assert t["period_us"] == (400.0 + 160.0) / 3


def test_call_timeline_lists_everything_when_calls_do_not_split_evenly():
    from pallas_kernels.bench.attention_timeline import call_timeline

    events = [{"name": "a", "ts": 0.0, "dur": 10.0}, {"name": "b", "ts": 20.0, "dur": 10.0},
              {"name": "memcpy", "ts": 40.0, "dur": 5.0}]
    t = call_timeline(events, calls=2)
    assert len(t["kernels"]) == 3
    assert t["busy_us"] == 12.5 and t["idle_us"] == 10.0  # per call: half of 25 busy and of the 10 + 10 idle


def test_implementation_lists_split_on_semicolons_or_commas():
    from pallas_kernels.bench.attention import _impl_list

    assert _impl_list("pallas,cudnn") == ["pallas", "cudnn"]
    assert _impl_list("pallas;cudnn") == ["pallas", "cudnn"]
    tuned = 'pallas:{"bwd_steps": 3, "block_kv": 64}'
    assert _impl_list(f"pallas;{tuned}") == ["pallas", tuned]
    assert _impl_list(tuned) == [tuned]


def test_bench_inputs_segment_kinds():
    assert attention_bench.make_inputs(1, 128, 2, 1, 64, None)[3] is None
    one = attention_bench.make_inputs(2, 128, 2, 1, 64, "one-doc")[3]
    assert one.shape == (2, 128) and (one == 1).all()
    packed = attention_bench.make_inputs(1, 4096, 2, 1, 64, "docs")[3]
    assert int(packed.max()) >= 2
    with pytest.raises(ValueError, match="'one-doc'"):
        attention_bench.make_inputs(1, 128, 2, 1, 64, True)


def test_sustained_attention_rows_and_ratio(monkeypatch):
    from pallas_kernels.bench import attention_sustained

    monkeypatch.setattr(attention_sustained, "SHAPES", [("tiny", 1, 128, 4, 2, 64, True, None)])
    original = attention_sustained._attention_fn
    reference = original("reference")

    def impl_fn(impl):  # "slow" is the reference with a sleep before it: the ratio must see it
        if impl == "slow":
            def fn(q, k, v, **kw):
                time.sleep(0.02)
                return reference(q, k, v, **kw)
            return fn
        return original(impl)

    monkeypatch.setattr(attention_sustained, "_attention_fn", impl_fn)
    monkeypatch.setattr(attention_sustained, "jitted_fwd_bwd",  # unjitted, so the sleep runs on every call
                        lambda attn, causal: lambda q, k, v, seg, do: attn(q, k, v, segment_ids=seg, causal=causal))
    rows = attention_sustained.measure(["tiny"], ["reference", "slow"], seconds=0.1, warmup_seconds=0.02, rounds=2)
    assert [r["impl"] for r in rows] == ["reference", "slow"]
    for row in rows:
        assert len(row["ms_rounds"]) == 2 and row["ms"] == pytest.approx(sorted(row["ms_rounds"])[0] / 2
                                                                         + sorted(row["ms_rounds"])[1] / 2, abs=2e-3)
        assert row["tflops"] == pytest.approx(3.5 * 4 * 128 * 128 * 4 * 64 / 2 / row["ms"] / 1e9, rel=1e-2)
    reference, slowed = rows
    assert slowed["ms"] >= 20.0 and slowed["speedup_vs_slow"] == 1.0
    assert reference["speedup_vs_slow"] == pytest.approx(slowed["ms"] / reference["ms"], rel=1e-2)
    assert reference["speedup_vs_slow"] > 1.0


@pytest.mark.parametrize("argv, message", [(["--shapes", "nope"], "--shapes: unknown ['nope']"),
                                           (["--rounds", "0"], "--rounds >= 1"),
                                           (["--impls", "pallas,pallas"], "distinct implementations")])
def test_sustained_attention_flags(argv, message, capsys):
    from pallas_kernels.bench import attention_sustained

    with pytest.raises(SystemExit) as exc:
        attention_sustained.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
