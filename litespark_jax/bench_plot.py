"""Bar charts of end-to-end benchmark results: tokens/s and MFU per model and variant.

    python -m litespark_jax.bench_plot docs/perf/e2e-h100.jsonl --out docs/perf/e2e-h100.png

Reads the JSONL rows that ``python -m litespark_jax.bench --jsonl FILE`` appends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from litespark_jax.cli import ArgumentParser


def load_rows(paths: list[str]) -> list[dict]:
    """The timed rows (with a config, a variant and tokens/s); loss-curve rows and a last line cut off while being
    appended are skipped; a file with none is a ``UserError``."""
    from litespark_jax.errors import UserError

    rows = []
    for path in paths:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                if number == len(lines):  # an append cut off by a kill
                    continue
                raise UserError(f"{path}:{number}: not a JSON row") from None
            if isinstance(row, dict) and {"config", "variant"} <= row.keys() and row.get("tokens_per_s") is not None:
                rows.append(row)
    if not rows:
        raise UserError(f"{', '.join(paths)}: no timed rows (with config, variant and tokens_per_s) to plot")
    return rows


def preset_name(row: dict) -> str:
    return os.path.basename(row["config"]).removesuffix(".yaml")


def bar_values(rows: list[dict], key: str) -> dict[tuple[str, str], float]:
    """``{(preset, variant): value}`` of ``key`` from the last row of each pair that has it."""
    values = {}
    for row in rows:
        if row.get(key) is not None:
            values[preset_name(row), row["variant"]] = row[key]
    return values


def plot(rows: list[dict], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(preset_name(r) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, scale in ((axes[0], "tokens_per_s", "tokens/s (one GPU)", 1.0),
                                  (axes[1], "mfu_causal", "MFU, causal convention (% of 989 TFLOP/s)", 100.0)):
        values = bar_values(rows, key)
        for i, variant in enumerate(variants):
            xs, ys = [], []
            for j, model in enumerate(models):
                if (model, variant) in values:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(values[model, variant] * scale)
            bars = ax.bar(xs, ys, width, label=variant)
            ax.bar_label(bars, fmt="{:,.0f}" if scale == 1.0 else "{:.1f}", fontsize=8)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(label)
        ax.set_xlabel("model preset")
        ax.legend()
    axes[0].set_title("Training throughput")
    axes[1].set_title("Model FLOPs utilization")
    fig.suptitle("LiteSpark vs baseline, same process, same tokens (H100 80GB)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.bench_plot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSONL files written by litespark_jax.bench --jsonl")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    for path in args.results:
        if not os.path.isfile(path):
            print(f"error: results file {path!r} does not exist", file=sys.stderr)
            return 2
    print(plot(load_rows(args.results), args.out))
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
