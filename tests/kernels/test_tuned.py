"""The tuned dispatch table: written by ``litespark_jax.autotune`` from the model's own calls, consulted by ``auto``
only for those exact calls on the device kind it was measured on, and checked up front as config input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

import pallas_kernels
from litespark_jax import autotune
from litespark_jax.config import load_config
from litespark_jax.errors import ConfigError

TINY = ["model.num_layers=1", "train.seq_len=64", "train.global_batch_size=2"]


@pytest.fixture(autouse=True)
def no_table():
    pallas_kernels.use_table(None)
    yield
    pallas_kernels.use_table(None)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "table.json"
    assert autotune.main(["--config", "configs/tiny.yaml", "--out", str(path), "--iters", "1", "--no-step-check",
                          *TINY]) == 0
    return path


def test_autotune_times_every_kernel_call_of_the_model(table_path):
    table = json.loads(table_path.read_text())
    assert table["version"] == 1 and table["device_kind"] == pallas_kernels.tuned.device_kind()
    assert sorted(e["kernel"] for e in table["entries"]) == ["attention", "cross_entropy_sum", "mlp", "rms_norm"]
    registries = pallas_kernels.registries()
    for e in table["entries"]:
        available = {n for n in registries[e["kernel"]].names() if registries[e["kernel"]].available(n)}
        assert set(e["ms"]) == available and e["best"] in e["ms"]
        assert e["ms"][e["best"]] == min(e["ms"].values()) and "step_tokens_per_s" not in e
    mlp = next(e for e in table["entries"] if e["kernel"] == "mlp")
    assert mlp["call"]["x_shape"] == [2, 64, 192] and mlp["call"]["w_shape"][1] == 2


def test_step_check_keeps_only_the_picks_that_speed_up_the_whole_step(monkeypatch, capsys):
    """Each pick that differs from the rule is timed alone in the training step (bench.measure, faked here: it
    resolves the model's kernel calls under the candidate table, as tracing the step does, and scores the step by
    what they resolved to); only a pick that wins by the margin stays, the other keeps its isolated timing aside."""
    from litespark_jax import bench

    config = load_config("configs/tiny.yaml", TINY)
    calls = autotune.model_calls(config)
    speed = {("mlp", "fused_bf16"): 1.03, ("rms_norm", "reference"): 1.002}  # +3% and +0.2% over auto's rule
    seen_tables = []

    def fake_measure(name, cfg, batch, steps, warmup):
        assert batch["inputs"].shape == (2, 64) and "segment_ids" in batch
        seen_tables.append(cfg.model.kernel_table)
        pallas_kernels.use_table(cfg.model.kernel_table)
        tps = 1000.0
        for kernel, info in calls:
            impl = pallas_kernels.registries()[kernel].resolve("auto", **info)[0]
            tps *= speed.get((kernel, impl), 1.0)
        return {"tokens_per_s": tps}

    monkeypatch.setattr(bench, "measure", fake_measure)
    entries = []
    for kernel, info in calls:
        default = pallas_kernels.registries()[kernel].rule(**info)
        best = {"mlp": "fused_bf16", "rms_norm": "reference"}.get(kernel, default)
        entries.append({"kernel": kernel, "call": json.loads(pallas_kernels.tuned.call_key(info)), "best": best,
                        "default": default, "ms": {}})
    table = {"version": 1, "device_kind": pallas_kernels.tuned.device_kind(), "entries": entries}
    autotune.step_check(config, table, steps=1, warmup=0, margin=0.005)
    by_kernel = {e["kernel"]: e for e in table["entries"]}
    assert by_kernel["mlp"]["best"] == "fused_bf16" and "kernel_best" not in by_kernel["mlp"]
    assert by_kernel["mlp"]["step_tokens_per_s"] == {"fused": 1000.0, "fused_bf16": 1030.0}
    assert by_kernel["rms_norm"]["best"] == by_kernel["rms_norm"]["default"] == "fused"
    assert by_kernel["rms_norm"]["kernel_best"] == "reference"
    assert seen_tables[0] is None and len(seen_tables) == 3  # auto once, then each differing pick alone
    assert "not kept" in capsys.readouterr().out
    assert pallas_kernels.tuned.tuned_choice("mlp", calls[-1][1]) is None  # the candidate tables are unloaded


def test_step_check_refuses_to_judge_a_call_the_step_never_makes(monkeypatch):
    from litespark_jax import bench

    config = load_config("configs/tiny.yaml", TINY)
    monkeypatch.setattr(bench, "measure", lambda *a: {"tokens_per_s": 1.0})  # traces nothing
    entry = {"kernel": "mlp", "call": {"x_shape": [9, 9, 9]}, "best": "fused_bf16", "default": "fused", "ms": {}}
    table = {"version": 1, "device_kind": pallas_kernels.tuned.device_kind(), "entries": [entry]}
    with pytest.raises(RuntimeError, match="never made the tuned mlp call"):
        autotune.step_check(config, table, steps=1, warmup=0, margin=0.0)


def test_auto_takes_the_tables_choice_for_exactly_the_tuned_calls(table_path, tmp_path):
    table = json.loads(table_path.read_text())
    mlp = next(e for e in table["entries"] if e["kernel"] == "mlp")
    mlp["best"] = "reference"  # not what the rule picks (fused), so a hit is visible
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(table))
    registry = pallas_kernels.registries()["mlp"]
    info = dict(mlp["call"], x_shape=tuple(mlp["call"]["x_shape"]), w_shape=tuple(mlp["call"]["w_shape"]),
                dtype=jnp.dtype(mlp["call"]["dtype"]))
    assert registry.resolve("auto", **info)[0] == "fused"
    assert pallas_kernels.use_table(str(path)) == len(table["entries"])
    assert registry.resolve("auto", **info)[0] == "reference"
    other = dict(info, x_shape=(4, 64, 192))  # a call the table did not time: the rule
    assert registry.resolve("auto", **other)[0] == "fused"
    assert registry.resolve("fused", **info)[0] == "fused"  # a named impl is never overridden


def test_a_table_from_another_device_kind_is_not_used(table_path, tmp_path, capsys):
    table = json.loads(table_path.read_text())
    table["device_kind"] = "NVIDIA H100 80GB HBM3" if table["device_kind"] != "NVIDIA H100 80GB HBM3" else "cpu"
    for e in table["entries"]:
        e["best"] = "reference"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(table))
    assert pallas_kernels.use_table(str(path)) == 0
    assert "not used" in capsys.readouterr().err
    mlp = next(e for e in table["entries"] if e["kernel"] == "mlp")
    info = dict(mlp["call"], x_shape=tuple(mlp["call"]["x_shape"]), w_shape=tuple(mlp["call"]["w_shape"]))
    assert pallas_kernels.registries()["mlp"].resolve("auto", **info)[0] == "fused"


def test_an_implementation_that_disagrees_with_the_default_is_not_eligible():
    registry = pallas_kernels.registries()["mlp"]
    registry.register("broken")(lambda x, wgu, wd: jnp.zeros((*x.shape[:-1], wd.shape[1]), x.dtype))
    try:
        entry = autotune.tune_call("mlp", {"x_shape": (32, 16), "w_shape": (16, 2, 24), "dtype": jnp.float32},
                                   iters=1, tolerance=3e-2)
    finally:
        registry._impls.pop("broken")
    assert "broken" in entry["ms"] and "differs from 'fused'" in entry["not_eligible"]["broken"]
    assert entry["best"] != "broken"


@pytest.mark.parametrize("content,message", [
    (None, "cannot read the kernel table"),
    ("{not json", "not JSON"),
    ('{"version": 1, "entries": [{"kernel": "mlp", "call": {}, "best": "fastest"}]}', "no implementation 'fastest'"),
    ('{"version": 1, "entries": [{"kernel": "conv", "call": {}, "best": "x"}]}', "unknown kernel 'conv'"),
    ('{"entries": []}', "not a version-1 kernel table"),
    ('{"version": 1, "entries": [{"kernel": "mlp", "call": [1, 2], "best": "fused"}]}',
     "kernel and best must be strings and call an object"),
    ('{"version": 1, "entries": [{"kernel": ["mlp"], "call": {}, "best": "fused"}]}',
     "kernel and best must be strings and call an object"),
])
def test_a_bad_kernel_table_is_a_config_error_naming_the_key_and_file(tmp_path, content, message):
    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"model.kernel_table: {path}: .*{message}"):
        load_config("configs/tiny.yaml", [f"model.kernel_table={path}"])
