"""The device timeline of attention forward+backward calls: which kernels run, for how long, and the gaps.

    python -m pallas_kernels.bench.attention_timeline [SHAPE] [--impls pallas,cudnn] [--calls 5] [--trace-dir DIR]

Runs ``calls`` forward+backward calls of each implementation back to back (as ``fwdbwd_stream_ms`` in the attention
bench) under ``jax.profiler`` and prints, per implementation, the kernels of the middle call in launch order with
their start, duration and the idle gap before each, then the per-call device time: busy (kernels running), idle
(gaps between them) and period (one call's share of the whole traced span). The bench's per-call times cannot say
whether a difference is kernel time or idle device time; this does. Trace with command buffers off
(``XLA_FLAGS=--xla_gpu_enable_command_buffer=``) to see each kernel instead of a CUDA graph.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax

from litespark_jax import trace_summary
from pallas_kernels.bench.attention import SHAPES, _attention_fn, _impl_list, jitted_fwd_bwd, make_inputs


def call_timeline(kernels: list[dict], calls: int) -> dict:
    """Split one implementation's traced kernels (``calls`` calls, in launch order) into calls and describe the
    middle one: ``kernels`` as (name, start us from the call's first kernel, duration us, gap us before it), and
    per-call ``busy_us``, ``idle_us`` (gaps inside the call plus the one before it) and ``period_us``."""
    kernels = sorted(kernels, key=lambda e: e["ts"])
    if not kernels:
        raise ValueError("no kernels to split into calls")
    if len(kernels) % calls:  # something ran that is not part of every call: show them all, as one block
        print(f"# {len(kernels)} kernels do not split into {calls} equal calls: listing all of them")
        per_call, first = len(kernels), 0
    else:
        per_call = len(kernels) // calls
        first = per_call * (calls // 2)
    rows = []
    prev_end = kernels[first - 1]["ts"] + kernels[first - 1]["dur"] if first else kernels[0]["ts"]
    start = kernels[first]["ts"]
    for e in kernels[first:first + per_call]:
        rows.append((e.get("name", "?"), e["ts"] - start, e["dur"], max(0.0, e["ts"] - prev_end)))
        prev_end = max(prev_end, e["ts"] + e["dur"])
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    share = per_call * calls / len(kernels)  # 1, or ``calls`` when all of them were listed as one block
    return {"kernels": rows, "busy_us": sum(r[2] for r in rows) / share, "idle_us": sum(r[3] for r in rows) / share,
            "period_us": span / calls}


def trace_impl(impl: str, shape, calls: int, trace_dir: str) -> dict:
    _, b, s, h, kvh, d, causal, docs = shape
    args = make_inputs(b, s, h, kvh, d, docs)
    fn = jitted_fwd_bwd(_attention_fn(impl), causal)
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
    kernels, _ = trace_summary.device_kernels(trace_summary.load_events(trace_summary.find_trace(trace_dir)))
    return call_timeline(kernels, calls)


def main(argv=None) -> int:
    names = [s[0] for s in SHAPES]
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench.attention_timeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", nargs="?", default="llama-8b-s8k", help=f"one of {', '.join(names)}")
    parser.add_argument("--impls", default="pallas,cudnn",
                        help="implementations (the bench's names), comma- or semicolon-separated (semicolons when "
                             "one holds a colon: pallas:{\"field\": value})")
    parser.add_argument("--calls", type=int, default=5, help="forward+backward calls traced back to back")
    parser.add_argument("--trace-dir", default=None, help="keep the traces here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.shape not in names:
        parser.error(f"unknown shape {args.shape!r}; choose from {', '.join(names)}")
    if args.calls < 1:
        parser.error(f"--calls {args.calls}: must be at least 1")
    if jax.default_backend() != "gpu":
        print("error: attention_timeline traces GPU kernels; no GPU here", file=sys.stderr)
        return 2
    shape = SHAPES[names.index(args.shape)]
    root = args.trace_dir or tempfile.mkdtemp(prefix="attention_timeline_")
    for impl in _impl_list(args.impls):
        t = trace_impl(impl, shape, args.calls, os.path.join(root, impl.replace(":", "_").replace("/", "_")))
        print(f"# {args.shape} {impl}: period {t['period_us'] / 1e3:.3f} ms per call, busy {t['busy_us'] / 1e3:.3f},"
              f" idle {t['idle_us'] / 1e3:.3f}")
        for name, start, dur, gap in t["kernels"]:
            print(f"  {start / 1e3:8.3f} ms  {dur / 1e3:7.3f} ms  gap {gap:7.1f} us  {name[:90]}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
