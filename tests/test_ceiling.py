"""The power-limited ceiling tool: its GEMM list is the model's matmul work, each product is the one named, and the
command line times them and bounds a step."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from litespark_jax import ceiling
from litespark_jax.cli import run_main
from litespark_jax.config import load_config

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize("tied", [True, False])
def test_the_gemms_are_six_flops_per_matrix_parameter_per_token(tied):
    model = dataclasses.replace(load_config(TINY).model, tie_embeddings=tied, num_kv_heads=2)
    tokens = 3 * 128
    norm_params = model.d_model * (2 * model.num_layers + 1)
    untied_input_embedding = 0 if tied else model.vocab_size * model.d_model  # a lookup, no product
    matrix_params = model.num_params() - norm_params - untied_input_embedding
    gemms = ceiling.step_gemms(model, tokens)
    assert sum(g.flops for g in gemms) == 6 * matrix_params * tokens
    assert {g.kind for g in gemms} == {"forward", "input_grad", "weight_grad"}
    kv = [g for g in gemms if g.name == "kv" and g.kind == "forward"]
    assert kv == [ceiling.Gemm("kv", "forward", tokens, model.d_model, 2 * model.resolved_head_dim,
                               2 * model.num_layers)]


@pytest.mark.parametrize("kind", ["forward", "input_grad", "weight_grad"])
def test_each_program_is_the_product_it_names(kind):
    gemm = ceiling.Gemm("w", kind, 48, 32, 16, 1)
    fn, (a, b) = ceiling._gemm_program(gemm)
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    products = {"forward": lambda: a32 @ b32, "input_grad": lambda: a32 @ b32.T, "weight_grad": lambda: a32.T @ b32}
    expected = products[kind]()
    out = fn(a, b)
    assert out.shape == (48, 16) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


def test_sustained_times_whole_batches_for_the_window():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    run = ceiling.sustained(fn, (jnp.zeros(4),), seconds=0.05, warmup_seconds=0.01)
    assert run["calls"] >= 1 and run["calls"] <= len(calls)
    assert run["s_per_call"] * run["calls"] >= 0.05  # the window covers whole batches, at least the seconds asked


def test_command_line_bounds_the_step_with_its_rows(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    argv = ["--config", TINY, "--seconds", "0.01", "--warmup-seconds", "0.01", "--attention", "reference",
            "--json", str(out), "train.global_batch_size=2", "train.seq_len=64"]
    assert ceiling.main(argv) == 0
    result = json.loads(out.read_text())
    model = load_config(TINY).model
    assert (result["batch"], result["seq_len"], result["tokens"]) == (2 // jax.device_count(), 64, 128)
    assert [r["name"] for r in result["rows"]][-1] == "attention"
    total_ms = sum(r["step_ms"] for r in result["rows"])
    assert result["ceiling_step_s"] == pytest.approx(total_ms / 1e3)
    for row in result["rows"]:
        assert row["step_ms"] == pytest.approx(row["s_per_call"] * row["count"] * 1e3)
    attention_tflop = 6 * model.d_model * 64 * 128 * model.num_layers / 1e12
    no_gemm_params = model.d_model * (2 * model.num_layers + 1) + model.vocab_size * model.d_model  # norms, lookup
    assert not model.tie_embeddings
    assert result["step_model_tflop"] == pytest.approx(result["gemm_tflop"] + attention_tflop
                                                       + 6 * no_gemm_params * 128 / 1e12)
    assert result["ceiling_mfu"] is None  # a CPU has no known peak
    assert "ceiling (GEMMs + attention only, sustained)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--seconds", "0"], "--seconds must be > 0"),
    (["--attention", "flash"], "invalid choice"),
    (["train.global_batch_size=0"], "global_batch_size"),
])
def test_bad_input_fails_in_one_line(argv, message, capsys):
    try:
        code = run_main(ceiling.main, ["--config", TINY, *argv])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_product_the_step_runs_as_its_own_kernel_counts_in_place_of_xlas(monkeypatch):
    model = dataclasses.replace(load_config(TINY).model, num_layers=1)
    tokens = 2 * 32

    def step_gate_up(tokens_, model_):  # a stand-in for the Pallas kernel: XLA's product, twice (twice as slow)
        fn, args = ceiling._gemm_program(ceiling.Gemm("gate_up", "forward", tokens_, model_.d_model,
                                                      2 * model_.d_ff, 1))
        return jax.jit(lambda x, w: (fn(x, w), fn(x + 1, w))), args

    monkeypatch.setattr(ceiling, "_step_gate_up_program", step_gate_up)
    result = ceiling.measure(model, 2, 32, 0.01, 0.01, "reference", None)
    gate_up = [r for r in result["rows"] if r["name"] == "gate_up" and r["kind"].startswith("forward")]
    assert [(r["kind"], r["in_ceiling"]) for r in gate_up] == [("forward", False), ("forward, step's kernel", True)]
    assert result["ceiling_step_s"] == pytest.approx(sum(r["step_ms"] for r in result["rows"] if r["in_ceiling"]) / 1e3)
    plain = ceiling.measure(model, 2, 32, 0.01, 0.01, "reference", None, step_kernels=False)
    assert all(r["in_ceiling"] for r in plain["rows"]) and len(plain["rows"]) == len(result["rows"]) - 1
