"""The kernel benchmarks' timing helpers and the attention bench's rows, on the CPU at a tiny shape."""

import time
import types

import jax.numpy as jnp

from pallas_kernels.bench import attention as attention_bench
from pallas_kernels.bench.mlp import stream_ms, time_ms


def _sleeper(seconds, calls):
    def fn(x):
        calls.append(1)
        time.sleep(seconds)
        return x + 1
    return fn


def test_stream_ms_makes_warmup_plus_calls_calls_and_times_each():
    calls = []
    ms = stream_ms(_sleeper(0.01, calls), jnp.zeros(3), calls=4, warmup=2)
    assert len(calls) == 6
    assert 10.0 <= ms < 100.0


def test_time_ms_is_the_median_per_call():
    calls = []
    ms = time_ms(_sleeper(0.005, calls), jnp.zeros(3), iters=3, warmup=1)
    assert len(calls) == 4
    assert 5.0 <= ms < 100.0


def test_attention_bench_rows_have_both_timings_and_small_errors(monkeypatch):
    monkeypatch.setattr(attention_bench, "SHAPES", [("tiny", 1, 128, 4, 2, 64, True, True)])
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
