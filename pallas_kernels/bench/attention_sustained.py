"""Attention forward+backward under sustained load: each implementation dispatched back to back for several seconds,
as a training run keeps the card busy, with its power, energy per call and SM clock.

    python -m pallas_kernels.bench.attention_sustained [--shapes llama-8b-s4k,llama-8b-s8k] [--impls pallas,cudnn]
                                                       [--seconds 4] [--rounds 2] [--json out.json]

``python -m pallas_kernels.bench --only attention`` times short bursts, in which an H100 runs near its full clock.
A training step keeps the card at its 700 W limit, with the clock held down (docs/PERFORMANCE.md). There a kernel is
as fast as its energy per call allows. Here every implementation runs ``--seconds`` per round after a warm-up, in
alternating order over ``--rounds``, so drift in the card's clock hits all of them alike. The printed rate uses the
attention bench's FLOP convention (forward+backward = 3.5 x the causal forward's two matmuls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import jax

from litespark_jax.ceiling import sustained
from litespark_jax.cli import ArgumentParser, require_positive, require_writable_file, run_main
from pallas_kernels.bench.attention import SHAPES, QUICK, _attention_fn, _impl_list, jitted_fwd_bwd, make_inputs


def measure(shape_names, impls, seconds: float, warmup_seconds: float, rounds: int, progress=None) -> list[dict]:
    shapes = {s[0]: s for s in SHAPES}
    rows = []
    for name in shape_names:
        _, b, s, h, kvh, d, causal, docs = shapes[name]
        q, k, v, seg, do = make_inputs(b, s, h, kvh, d, docs)
        flops = 3.5 * 4 * b * s * s * h * d / (2 if causal else 1)
        fns = {impl: jitted_fwd_bwd(_attention_fn(impl), causal) for impl in impls}
        runs = {impl: [] for impl in impls}
        for r in range(rounds):
            order = impls if r % 2 == 0 else impls[::-1]
            for impl in order:
                runs[impl].append(sustained(fns[impl], (q, k, v, seg, do), seconds, warmup_seconds))
        for impl in impls:
            ms = statistics.median(run["s_per_call"] for run in runs[impl]) * 1e3
            watts = [run["watts"] for run in runs[impl] if run["watts"] is not None]
            mhz = [run["sm_clock_mhz"] for run in runs[impl] if run["sm_clock_mhz"] is not None]
            capped = [run["power_capped"] for run in runs[impl] if run["power_capped"] is not None]
            row = {"shape": name, "impl": impl, "B": b, "S": s, "H": h, "KV": kvh, "D": d, "causal": causal,
                   "device": jax.devices()[0].device_kind, "seconds": seconds, "rounds": rounds,
                   "ms": round(ms, 3), "ms_rounds": [round(run["s_per_call"] * 1e3, 3) for run in runs[impl]],
                   "tflops": flops / ms / 1e9,
                   "watts": round(statistics.mean(watts), 1) if watts else None,
                   "joules_per_call": round(statistics.mean(watts) * ms / 1e3, 3) if watts else None,
                   "sm_clock_mhz": statistics.median(mhz) if mhz else None,
                   "power_capped": round(statistics.mean(capped), 3) if capped else None}
            rows.append(row)
            if progress:
                progress(row)
        if len(impls) > 1:
            base = next(row for row in rows[-len(impls):] if row["impl"] == impls[-1])
            for row in rows[-len(impls):]:
                row[f"speedup_vs_{impls[-1]}"] = round(base["ms"] / row["ms"], 3)
    return rows


def _print_row(row: dict) -> None:
    print("  ".join(f"{k}={v:.1f}" if k == "tflops" else f"{k}={v}" for k, v in row.items()
                    if k not in ("device", "causal")), flush=True)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m pallas_kernels.bench.attention_sustained", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(QUICK),
                        help=f"comma-separated shape names of the attention bench (default {','.join(QUICK)}; "
                             f"known: {', '.join(s[0] for s in SHAPES)})")
    parser.add_argument("--impls", default="pallas,cudnn",
                        help="comma-separated implementations, or semicolon-separated when one holds a comma "
                             "(pallas:{\"backward\": \"fused\"}: a kernel config); ratios are against the last "
                             "(default pallas,cudnn)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per implementation and round")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="untimed seconds before each timed window")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the order of the implementations alternating")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    known = {s[0] for s in SHAPES}
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in known]
    if unknown or not shapes:
        parser.error(f"--shapes: unknown {unknown or 'empty list'}; known: {', '.join(sorted(known))}")
    impls = [i for i in _impl_list(args.impls) if i]
    if not impls or len(set(impls)) != len(impls):
        parser.error(f"--impls: give one or more distinct implementations, not {args.impls!r}")
    require_positive(parser, args, "seconds", "warmup_seconds")
    if args.rounds < 1:
        parser.error("--rounds >= 1 needed: each round times every implementation once")
    require_writable_file(parser, "--json", args.json)
    print(f"device: {jax.devices()[0].device_kind}; {args.seconds:g} s per implementation and round, "
          f"{args.rounds} round(s)", flush=True)
    rows = measure(shapes, impls, args.seconds, args.warmup_seconds, args.rounds, progress=_print_row)
    for row in rows:
        if f"speedup_vs_{impls[-1]}" in row:
            print(f"{row['shape']:<22}{row['impl']:<10}{row['ms']:>9.3f} ms  {row['tflops']:>7.1f} TFLOP/s  "
                  f"{row[f'speedup_vs_{impls[-1]}']:.3f}x {impls[-1]}  "
                  f"{row['joules_per_call'] if row['joules_per_call'] is not None else '-'} J/call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
