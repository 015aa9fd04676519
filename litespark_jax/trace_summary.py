"""Where a step's device time goes: a summary of a ``jax.profiler`` trace, by kernel category and by XLA op.

    python -m litespark_jax.trace_summary TRACE_DIR [--steps N] [--top 25] [--hlo XLA_DUMP_DIR]

Reads the newest ``perfetto_trace.json.gz`` under ``TRACE_DIR`` (``jax.profiler.trace(dir,
create_perfetto_trace=True)``, which ``python -m litespark_jax.bench --profile DIR`` writes) and sums the durations
of the kernels that ran on the GPU(s). Time is per traced step when ``--steps`` is given. XLA's GPU command buffers
(CUDA graphs) show up as ``command_buffer_N`` ops with their kernels' categories mixed; trace with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to see each kernel under its own XLA op. Without a GPU in the trace
(a CPU run) the XLA CPU thunks are summarised instead, so the tool can be tested anywhere.

With several GPUs in the trace it also says, per GPU and step, how long the NCCL collectives ran, how much of that
no other kernel ran beside them (exposed communication), and how much of the step that GPU ran no computation at all
(the span minus the union of its non-collective kernels): what FSDP or data parallelism costs beyond the compute.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

from litespark_jax.cli import ArgumentParser
from litespark_jax.errors import UserError

# Substrings of kernel names, checked in order, that say what a kernel does. Names seen on H100 with jax 0.11:
# cuBLAS/cuBLASLt "sm90_xmma_gemm_*", "nvjet_*", cutlass "cutlass_*"; cuDNN flash attention "cudnn_generated_*";
# XLA fusions "loop_*_fusion", "input_*_fusion"; Triton GEMM fusions "gemm_fusion_*"/"triton_*"; our jax-triton
# kernels are named after their functions, "*_triton" (pallas_kernels/*/triton_kernel.py).
COLLECTIVE = "collective (NCCL)"
CATEGORIES = (
    (COLLECTIVE, ("nccl",)),  # first: "ncclDevKernel_ReduceScatter_Sum_bf16_*" is no reduction fusion
    ("attention (cuDNN)", ("cudnn", "fmha", "flash_fprop", "flash_bprop")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
    ("Triton (jax-triton)", ("_triton",)),
    ("Pallas / Mosaic GPU", ("mosaic", "pallas", "_attention", "_flash", "swiglu")),
    ("copy / memset", ("memcpy", "memset", "copy", "transpose")),
    ("reduction fusion", ("input_", "reduce", "reduction")),
    ("elementwise fusion", ("loop_", "fusion", "convert", "broadcast", "select", "add", "multiply")),
)


def categorize(kernel_name: str) -> str:
    lower = kernel_name.lower()
    for category, needles in CATEGORIES:
        if any(n in lower for n in needles):
            return category
    return "other"


def find_trace(trace_dir: str) -> str:
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise UserError(f"{trace_dir}: no perfetto_trace.json.gz under it (trace with "
                        "jax.profiler.trace(dir, create_perfetto_trace=True) or bench --profile)")
    return max(paths, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError) as e:  # EOFError: cut off (a trace still being written, or killed)
        raise UserError(f"{path}: not a readable perfetto JSON trace ({e})") from None
    if isinstance(data, dict) and "traceEvents" not in data:
        raise UserError(f"{path}: not a perfetto JSON trace (no traceEvents)")
    return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(events: list[dict]) -> tuple[list[dict], str]:
    """The complete ("X") events of the GPU processes, or of the XLA CPU executor threads if there is no GPU."""
    process_names = {e["pid"]: e["args"]["name"] for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in process_names.items() if "GPU" in name or "/device:" in name}
    if gpu_pids:
        return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e], "gpu"
    # CPU: the thunks XLA ran carry an ``hlo_op`` argument.
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {}) and "dur" in e], "cpu"


def summarize(events: list[dict], steps: int = 1, top: int = 25) -> dict:
    """Totals per category and the ``top`` XLA ops by time, in milliseconds per step."""
    kernels, source = device_kernels(events)
    if not kernels:
        raise UserError("the trace holds no device kernels (was anything run inside jax.profiler.trace?)")
    per_category = collections.Counter()
    per_op = collections.Counter()
    op_calls = collections.Counter()
    op_category: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    categories = [categorize(e.get("name", "?")) for e in kernels]
    for e, category in zip(kernels, categories):
        ms = e["dur"] / 1000.0 / steps
        name = e.get("name", "?")
        op = e.get("args", {}).get("hlo_op") or name
        per_category[category] += ms
        per_op[op] += ms
        op_calls[op] += 1
        op_category[op][category] += ms  # an op may launch several kernels (a memset, then the GEMM)
    busy = sum(per_category.values())
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    return {
        "source": source,
        "steps": steps,
        "devices": len({e.get("pid") for e in kernels}),
        "busy_ms_per_step": busy,
        "span_ms_per_step": (end - start) / 1000.0 / steps,
        "per_device": _overlap(kernels, categories, end - start, steps),
        "categories": {c: {"ms": ms, "share": ms / busy} for c, ms in per_category.most_common()},
        "top_ops": [{"op": op, "category": op_category[op].most_common(1)[0][0], "ms": ms,
                     "calls": op_calls[op] // max(steps, 1), "share": ms / busy} for op, ms in per_op.most_common(top)],
    }


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _length(intervals) -> float:
    return sum(hi - lo for lo, hi in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two merged, sorted interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _overlap(kernels: list[dict], categories: list[str], span_us: float, steps: int) -> dict:
    """Per device (averaged over them), ms per step: collectives, the part of them with no other kernel running
    on that device, and the part of the span that device computed nothing (span - union of its other kernels).
    ``categories``: each kernel's ``categorize``."""
    by_device = collections.defaultdict(lambda: ([], []))  # pid -> (collective, other) intervals
    for e, category in zip(kernels, categories):
        by_device[e.get("pid")][category != COLLECTIVE].append((e["ts"], e["ts"] + e["dur"]))
    collective = exposed = idle = 0.0
    for comm, compute in by_device.values():
        comm, compute = _merged(comm), _merged(compute)
        collective += _length(comm)
        exposed += _length(comm) - _intersection(comm, compute)
        idle += span_us - _length(compute)
    scale = 1000.0 * steps * len(by_device)
    return {"collective_ms": collective / scale, "exposed_collective_ms": exposed / scale,
            "compute_idle_ms": idle / scale}


_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.+?) [a-z][a-z0-9\-]*\(")


def hlo_sources(dump_dir: str, traced_ops=()) -> dict[str, tuple[str, str]]:
    """``instruction name -> (shape, op_name)`` from the optimized HLO XLA dumped into ``dump_dir``
    (``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text``): the jax operation each kernel came from.

    Every compiled program of the process is in the dump (the initialization, the step, ...) and they reuse
    instruction names, so where a name is in several modules the one holding most of ``traced_ops`` (the kernels
    of the trace: the profiled program) gives its source."""
    paths = glob.glob(os.path.join(dump_dir, "**", "*after_optimizations.txt"), recursive=True)
    if not paths:
        raise UserError(f"{dump_dir}: no *after_optimizations.txt under it (dump with XLA_FLAGS=--xla_dump_to=DIR "
                        "--xla_dump_hlo_as_text)")
    modules = []
    for path in sorted(paths):
        module = {}
        with open(path) as f:
            for line in f:
                m = _HLO_INSTRUCTION.match(line)
                if m:
                    op_name = re.search(r'op_name="([^"]*)"', line)
                    shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # drop layouts
                    module[m.group(1)] = (shape, op_name.group(1) if op_name else "")
        modules.append(module)
    traced = set(traced_ops)
    sources = {}
    for module in sorted(modules, key=lambda mod: len(traced.intersection(mod))):  # the best match last: it wins
        sources.update(module)
    return sources


def by_source(summary: dict, sources: dict[str, tuple[str, str]], top: int = 25) -> list[dict]:
    """The non-matmul time grouped by (category, output shape, jax op_name): the same fusion of every layer of an
    unrolled model, which the trace names differently per layer, adds up to one row."""
    groups: dict[tuple, dict] = {}
    for o in summary["top_ops"]:
        if o["category"] == "matmul":
            continue
        shape, source = sources.get(o["op"], ("?", "(not in the HLO dump)"))
        key = (o["category"], shape, source)
        g = groups.setdefault(key, {"category": o["category"], "shape": shape, "source": source, "ms": 0.0,
                                    "calls": 0, "ops": 0})
        g["ms"] += o["ms"]
        g["calls"] += o["calls"]
        g["ops"] += 1
    return sorted(groups.values(), key=lambda g: -g["ms"])[:top]


def format_by_source(rows: list[dict]) -> str:
    lines = [f"non-matmul time by source (top {len(rows)}):"]
    for g in rows:
        source = g["source"].removeprefix("jit(")[-80:]
        lines.append(f"  {g['ms']:>9.2f} ms x{g['calls']:<4} {g['category'][:18]:<18} {g['shape'][:44]:<44} {source}")
    return "\n".join(lines)


def summarize_trace(trace_dir: str, steps: int) -> dict:
    """``summarize`` of the newest trace under ``trace_dir``, also written to ``trace_dir/summary.json``."""
    summary = summarize(load_events(find_trace(trace_dir)), steps)
    with open(os.path.join(trace_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"device time per step: {s['busy_ms_per_step']:.1f} ms busy over a {s['span_ms_per_step']:.1f} ms span "
             f"({s['source']}, {s['steps']} step(s))"]
    for category, v in s["categories"].items():
        lines.append(f"  {category:<22} {v['ms']:>9.1f} ms  {100 * v['share']:5.1f}%")
    d = s.get("per_device")
    if d and s.get("devices", 1) > 1:
        lines.append(f"per device ({s['devices']}): {s['busy_ms_per_step'] / s['devices']:.1f} ms busy; collectives "
                     f"{d['collective_ms']:.1f} ms, {d['exposed_collective_ms']:.1f} ms of them exposed (nothing else "
                     f"running); no computation running for {d['compute_idle_ms']:.1f} ms of the span")
    lines.append(f"top {len(s['top_ops'])} ops:")
    for o in s["top_ops"]:
        lines.append(f"  {o['ms']:>9.2f} ms {100 * o['share']:5.1f}% x{o['calls']:<4} {o['category']:<20} {o['op'][:90]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.trace_summary", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", help="directory jax.profiler.trace wrote (searched recursively)")
    parser.add_argument("--steps", type=int, default=1, help="steps inside the trace, to report time per step")
    parser.add_argument("--top", type=int, default=25, help="how many ops to list")
    parser.add_argument("--json", default=None, help="also write the summary as JSON here")
    parser.add_argument("--hlo", default=None, metavar="DUMP_DIR",
                        help="XLA's HLO dump of the traced program: also group the non-matmul time by the jax "
                             "operation, output shape and category it came from")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    from litespark_jax.cli import require_writable_file

    require_writable_file(parser, "--json", args.json)
    events = load_events(find_trace(args.trace_dir))
    every_op = summarize(events, args.steps, top=len(events))
    summary = {**every_op, "top_ops": every_op["top_ops"][:args.top]}
    print(format_summary(summary))
    if args.hlo:
        traced = [o["op"] for o in every_op["top_ops"]]
        summary["by_source"] = by_source(every_op, hlo_sources(args.hlo, traced), args.top)
        print(format_by_source(summary["by_source"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
