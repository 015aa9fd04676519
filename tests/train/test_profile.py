"""log.profile_start: the loop traces a window of steps and writes a summary of where their device time went."""

import json

import pytest

from litespark_jax.config import ConfigError, load_config
from litespark_jax.train.loop import train

SMALL = ["model.num_layers=2", "train.seq_len=64", "train.global_batch_size=2", "train.eval_every=0",
         "log.progress_bar=false", "log.tensorboard=false", "checkpoint.every=0"]


def test_profile_window_writes_a_trace_summary(tmp_path, capsys):
    config = load_config("configs/tiny.yaml", [*SMALL, "train.steps=5", "log.profile_start=2", "log.profile_steps=2",
                                                f"train.run_dir={tmp_path}"])
    result = train(config)
    assert [h["step"] for h in result.history][-1] == 5  # training went on after the window
    summary = json.loads((tmp_path / "profile" / "process_0" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["busy_ms_per_step"] > 0
    assert sum(c["share"] for c in summary["categories"].values()) == pytest.approx(1.0)
    assert "profile of steps 2-3" in capsys.readouterr().out


def test_no_profile_by_default(tmp_path):
    train(load_config("configs/tiny.yaml", [*SMALL, "train.steps=2", f"train.run_dir={tmp_path}"]))
    assert not (tmp_path / "profile").exists()


def test_negative_profile_start_is_a_config_error():
    with pytest.raises(ConfigError, match="log.profile_start must be >= 0"):
        load_config("configs/tiny.yaml", ["log.profile_start=-1"])
