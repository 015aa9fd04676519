"""Plots of training metrics: ``python -m litespark_jax.plot RUN_DIR [RUN_DIR ...] [--out DIR]``.

Reads ``RUN_DIR/metrics.jsonl`` of each run (or a ``.jsonl`` file given directly) and draws every run on shared
axes, so runs compare side by side: training loss, validation loss, throughput, MFU and power, each against the
optimizer step. Writes one PNG per metric plus ``overview.png`` with all of them; metrics no run has (MFU on a
CPU, power without NVML) are left out and reported.

In a notebook: ``fig = overview_figure(load_runs([run_dir]))`` returns the matplotlib figure to show inline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from litespark_jax.cli import ArgumentParser
from litespark_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Panel:
    key: tuple[str, ...]
    """metrics.jsonl keys to read, first found wins (power has had several names)."""
    title: str
    ylabel: str
    scale: float = 1.0
    """Multiply values by this (MFU is a fraction in the logs, shown in percent)."""
    log_y: bool = False
    from_zero: bool = False
    """Start the y axis at 0 (rates: a 3% wiggle should not fill the plot)."""


PANELS = {
    "loss": Panel(("loss",), "Training loss", "cross-entropy (nats/token)"),
    "eval_loss": Panel(("eval_loss",), "Validation loss", "cross-entropy (nats/token)"),
    "tokens_per_second": Panel(("tokens_per_second",), "Throughput", "tokens/s (all devices)", from_zero=True),
    "mfu": Panel(("mfu",), "Model FLOPs utilization", "MFU (% of peak bf16)", scale=100.0, from_zero=True),
    "power": Panel(("power_w", "avg_power_w", "power_watts", "gpu_power_w"), "GPU power",
                   "average power per GPU (W)", from_zero=True),
}


@dataclasses.dataclass
class Run:
    label: str
    series: dict[str, tuple[list[int], list[float]]]
    """metric key -> (steps, values), sorted by step; a step logged twice (a resumed run) keeps its last value."""


def load_metrics(path: str, label: str | None = None) -> Run:
    """One run from ``RUN_DIR`` (reads ``RUN_DIR/metrics.jsonl``) or a ``metrics.jsonl`` path."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"no metrics at {file} (expected RUN_DIR/metrics.jsonl written by training)")
    by_key: dict[str, dict[int, float]] = {}
    with open(file) as f:
        lines = f.read().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last:  # a run killed mid-write leaves a partial last line: skip it, not garbage elsewhere
                break
            raise UserError(f"{file}:{i + 1}: not a JSON line") from None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(value):
                by_key.setdefault(key, {})[int(step)] = float(value)
    if label is None:
        label = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(file) or file))
    series = {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}
    return Run(label=label, series=series)


def load_runs(paths: list[str], labels: list[str] | None = None) -> list[Run]:
    if labels is not None and len(labels) != len(paths):
        raise UserError(f"--labels has {len(labels)} names for {len(paths)} runs")
    runs = [load_metrics(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for run in runs:  # two runs called "default" in different folders: keep them apart in the legend
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    return runs


def runs_from_history(history: list[dict], eval_history: list[dict] = (), label: str = "run") -> Run:
    """A Run from ``TrainResult.history`` / ``eval_history`` (in-memory, for notebooks)."""
    by_key: dict[str, dict[int, float]] = {}
    for row in list(history) + list(eval_history):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                by_key.setdefault(key, {})[int(row["step"])] = float(value)
    return Run(label=label, series={k: (sorted(p), [p[s] for s in sorted(p)]) for k, p in by_key.items()})


def _series(run: Run, panel: Panel):
    for key in panel.key:
        if key in run.series:
            steps, values = run.series[key]
            return steps, [v * panel.scale for v in values]
    return None


def available_panels(runs: list[Run]) -> list[str]:
    """Names of the panels at least one run has data for, in PANELS order."""
    return [name for name, panel in PANELS.items() if any(_series(r, panel) for r in runs)]


def panels_to_draw(runs: list[Run]) -> list[str]:
    """``available_panels``; none is a UserError (before anything is written)."""
    panels = available_panels(runs)
    if not panels:
        raise UserError("no plottable metrics (loss, eval_loss, tokens_per_second, mfu, power) in these runs")
    return panels


def draw_panel(ax, runs: list[Run], name: str) -> None:
    """Draw one metric of every run on ``ax``, with title, axis labels and units, and a legend."""
    panel = PANELS[name]
    for run in runs:
        data = _series(run, panel)
        if data is None:
            continue
        steps, values = data
        few = len(steps) <= 20
        ax.plot(steps, values, label=run.label, marker="o" if few else None, markersize=3, linewidth=1.5)
    ax.set_title(panel.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    if panel.log_y:
        ax.set_yscale("log")
    elif panel.from_zero:
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
    ax.grid(True, alpha=0.3)
    if name == "tokens_per_second":
        ax.yaxis.set_major_formatter(_thousands())
    ax.legend(fontsize="small")


def _thousands():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def overview_figure(runs: list[Run], panels: list[str] | None = None):
    """One matplotlib Figure with a panel per available metric (two columns)."""
    import matplotlib.pyplot as plt

    panels = panels or panels_to_draw(runs)
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        draw_panel(ax, runs, name)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("  vs  ".join(r.label for r in runs) if len(runs) > 1 else runs[0].label)
    fig.tight_layout()
    return fig


def plot_runs(paths: list[str], out_dir: str | None = None, labels: list[str] | None = None) -> list[str]:
    """Write ``<metric>.png`` for each available metric and ``overview.png`` into ``out_dir`` (default:
    ``<first run>/plots``); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = load_runs(paths, labels)
    out_dir = out_dir or os.path.join(paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0]) or ".",
                                      "plots")
    if (os.path.exists(out_dir) and not os.path.isdir(out_dir)) or out_dir.endswith(".png"):
        raise UserError(f"--out {out_dir}: plots are written into a directory (one PNG per panel), not a file")
    panels = panels_to_draw(runs)  # a run with nothing to plot leaves no empty directory behind
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw_panel(ax, runs, name)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig = overview_figure(runs, panels)
    path = os.path.join(out_dir, "overview.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m litespark_jax.plot",
        description="Plot loss, validation loss, tokens/s, MFU and power of one or more runs (their "
                    "metrics.jsonl) on shared axes.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory (or a metrics.jsonl file)")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: FIRST_RUN_DIR/plots)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: folder names)")
    args = parser.parse_args(argv)
    written = plot_runs(args.runs, args.out, args.labels)
    runs = load_runs(args.runs, args.labels)
    missing = [n for n in PANELS if n not in available_panels(runs)]
    for path in written:
        print(path)
    if missing:
        print(f"(no data for: {', '.join(missing)})")
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
