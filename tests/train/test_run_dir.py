"""The run directory keeps what every run wrote into it: a changed config does not overwrite the earlier one."""

from __future__ import annotations

import yaml

from litespark_jax.config import load_config
from litespark_jax.train.run_dir import record_config


def test_a_changed_config_keeps_the_earlier_one_beside_it(tmp_path):
    run_dir = str(tmp_path / "run")
    first = load_config("configs/tiny.yaml", [f"train.run_dir={run_dir}", "train.steps=30"])
    record_config(first)
    record_config(first)  # the same config again (a plain resume): nothing new
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]

    second = load_config("configs/tiny.yaml", [f"train.run_dir={run_dir}", "train.steps=60"])
    record_config(second)
    third = load_config("configs/tiny.yaml", [f"train.run_dir={run_dir}", "train.steps=90"])
    record_config(third)
    steps = {p.name: yaml.safe_load(p.read_text())["train"]["steps"] for p in (tmp_path / "run").iterdir()}
    assert steps == {"config.1.yaml": 30, "config.2.yaml": 60, "config.yaml": 90}
