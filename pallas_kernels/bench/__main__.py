"""Run the kernel benchmarks and print one table row per (kernel, shape, implementation)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

FAMILIES = ("attention", "mlp", "cross_entropy", "rms_norm")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench", description=__doc__)
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma-separated kernel families to run")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--jsonl", default=None, help="also append result rows to this JSONL file")
    args = parser.parse_args(argv)
    rows = []
    for family in args.only.split(","):
        if family not in FAMILIES:
            print(f"error: unknown kernel family {family!r}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
            return 2
        try:
            module = importlib.import_module(f"pallas_kernels.bench.{family}")
        except ModuleNotFoundError:
            print(f"# {family}: no benchmark yet")
            continue
        rows.extend(module.run(args))
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
