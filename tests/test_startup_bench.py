"""The start-up benchmark times real train processes, the later ones on the first one's compilation cache."""

import json

import pytest

from litespark_jax import startup_bench
from tests.checkpoint.conftest import TINY


def test_starts_on_one_cache_train_alike_and_report_their_times(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny steps compile in under 1 s
    out = tmp_path / "rows.jsonl"
    assert startup_bench.main(["--config", "configs/tiny.yaml", "--jsonl", str(out), *TINY]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["start"], r["cache"]) for r in rows] == [(1, "empty"), (2, "filled")]
    for row in rows:
        assert 0 < row["first_step_s"] < row["wall_s"]
    assert rows[0]["losses"] == rows[1]["losses"] and len(rows[0]["losses"]) == 2
    # The first start filled the cache; the second loaded every program from it and compiled nothing new.
    assert rows[0]["cache_entries"] >= 2 and rows[1]["cache_entries"] == rows[0]["cache_entries"], rows
    assert "start 2 (filled cache): first step after" in capsys.readouterr().out


def test_refuses_a_missing_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        startup_bench.main(["--config", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2 and "nope.yaml: no such file" in capsys.readouterr().err
