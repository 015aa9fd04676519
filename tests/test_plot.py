"""``python -m litespark_jax.plot``: metrics.jsonl of several runs -> labelled PNGs."""

import json
import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from litespark_jax import plot  # noqa: E402
from litespark_jax.errors import UserError  # noqa: E402


def write_run(directory, *, speed, mfu=True, power=False, partial_last_line=False):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for step in range(10, 110, 10):
            row = {"step": step, "time": 1.7e9 + step, "loss": 2 + 4 * math.exp(-step / 30), "grad_norm": 1.0,
                   "tokens_per_second": speed, "learning_rate": 1e-3}
            if mfu:
                row["mfu"] = 0.4
            if power:
                row["power_w"] = 550.0
            f.write(json.dumps(row) + "\n")
            if step % 50 == 0:
                f.write(json.dumps({"step": step, "time": 1.7e9 + step, "eval_loss": 2.5 + 4 * math.exp(-step / 30)})
                        + "\n")
        if partial_last_line:
            f.write('{"step": 110, "loss": 2.')
    return directory


def test_cli_writes_labelled_pngs_for_two_runs(tmp_path, capsys):
    a = write_run(tmp_path / "baseline", speed=1000.0, power=True)
    b = write_run(tmp_path / "litespark", speed=2000.0, partial_last_line=True)
    out = tmp_path / "plots"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert names == ["eval_loss.png", "loss.png", "mfu.png", "overview.png", "power.png", "tokens_per_second.png"]
    for name in names:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "overview.png" in capsys.readouterr().out


def test_panels_have_units_and_one_line_per_run(tmp_path):
    runs = plot.load_runs([write_run(tmp_path / "a", speed=1.0), write_run(tmp_path / "b", speed=2.0)])
    assert plot.available_panels(runs) == ["loss", "eval_loss", "tokens_per_second", "mfu"]  # no power data
    fig, ax = plt.subplots()
    for name, unit in (("loss", "nats/token"), ("tokens_per_second", "tokens/s"), ("mfu", "%")):
        ax.clear()
        plot.draw_panel(ax, runs, name)
        assert ax.get_xlabel() == "optimizer step"
        assert unit in ax.get_ylabel()
        assert [line.get_label() for line in ax.get_lines()] == ["a", "b"]
    ax.clear()
    plot.draw_panel(ax, runs, "mfu")
    assert list(ax.get_lines()[0].get_ydata())[0] == pytest.approx(40.0)  # fraction shown in percent
    plt.close(fig)


def test_resumed_run_keeps_last_value_per_step_and_eval_is_separate(tmp_path):
    d = write_run(tmp_path / "r", speed=1.0)
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:  # resumed from step 50: steps 60.. logged again
        f.write(json.dumps({"step": 60, "time": 0, "loss": 9.0}) + "\n")
    run = plot.load_metrics(d)
    steps, values = run.series["loss"]
    assert steps == sorted(set(steps)) and values[steps.index(60)] == 9.0
    assert run.series["eval_loss"][0] == [50, 100]


def test_history_from_memory_and_bad_input(tmp_path):
    run = plot.runs_from_history([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}], [{"step": 2, "eval_loss": 2.5}])
    fig = plot.overview_figure([run])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    plt.close(fig)
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot.load_metrics(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('not json\n{"step": 1, "loss": 1.0}\n')
    with pytest.raises(UserError, match=":1: not a JSON line"):
        plot.load_metrics(str(bad))


def test_out_that_names_a_file_is_refused(tmp_path):
    run = write_run(tmp_path / "run", speed=1.0)
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "plot.png"):  # bench_plot's --out is a PNG; this one a directory
        with pytest.raises(UserError, match=r"plots are written into a directory \(one PNG per panel\), not a file"):
            plot.plot_runs([str(run)], out_dir=str(out))
    assert not (tmp_path / "plot.png").exists()


def test_a_run_with_nothing_to_plot_leaves_no_plots_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "grad_norm": 1.0}) + "\n")
    with pytest.raises(UserError, match="no plottable metrics"):
        plot.plot_runs([str(run)])
    assert not (run / "plots").exists()
