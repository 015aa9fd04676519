"""Post-training throughput: SFT and DPO steps on the bundled examples, through the same trainers as the CLIs.

    python -m litespark_jax.posttrain.bench [--kind sft|dpo|both] [--config YAML] [--steps N] [section.key=value ...]

Without ``--config`` each kind uses its preset (configs/sft-tiny.yaml, configs/dpo-tiny.yaml); overrides apply to
both. Batches are built before timing (data time excluded, as in ``litespark_jax.bench``). Printed per kind:
tokens/s (rows x seq_len per step, padding included, the number the training loop logs), trained tokens/s (tokens
with loss: assistant tokens for SFT, response tokens for DPO), step time, MFU where the peak is known (6 x params
per token; DPO's reference pass with ``posttrain.reference=model`` adds 2 x params per token on top), compile time,
and joules per token, the median SM clock and the share of the timed steps the power limit held it down, where NVML
is available. ``--json`` prints one JSON object per kind instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from litespark_jax.cli import ArgumentParser, run_main
from litespark_jax.config import load_config
from litespark_jax.energy import EnergyWindow
from litespark_jax.metrics import mfu

PRESETS = {"sft": "configs/sft-tiny.yaml", "dpo": "configs/dpo-tiny.yaml"}


def _preset(kind: str) -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, PRESETS[kind])


def measure(kind: str, config, steps: int, warmup: int) -> dict:
    from litespark_jax.posttrain.trainer import DPOTrainer, SFTTrainer

    trainer = (SFTTrainer if kind == "sft" else DPOTrainer)(config)
    state = trainer.init_state()
    iterator = trainer.train_iterator()  # DPO with reference=precomputed: the reference pass happens here
    batches = [next(iterator) for _ in range(min(steps + warmup, 16))]
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[0])
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(1, warmup):
        state, metrics = trainer.train_step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics["loss"])
    energy = EnergyWindow(clock_interval_s=0.1)
    energy.start()
    t0 = time.perf_counter()
    trained = 0.0
    for i in range(steps):
        batch = batches[(warmup + i) % len(batches)]
        trained += float(batch["loss_mask"].sum())
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    elapsed = time.perf_counter() - t0
    joules, watts = energy.stop()
    t = config.train
    tokens = steps * t.global_batch_size * t.seq_len
    tps = tokens / elapsed
    return {
        "kind": kind, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "params_m": config.model.num_params() / 1e6, "rows": t.global_batch_size, "seq_len": t.seq_len,
        "steps": steps, "tokens_per_second": tps, "trained_tokens_per_second": trained / elapsed,
        "step_ms": 1000 * elapsed / steps, "compile_s": compile_s,
        "mfu": mfu(tps, trainer.flops_per_token, trainer.peak_tflops, jax.device_count()),
        "joules_per_token": joules / tokens if joules is not None else None, "average_watts": watts,
        "sm_clock_mhz": energy.sm_clock_mhz, "power_capped_frac": energy.power_capped,
        "final_loss": float(metrics["loss"]),
    }


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.posttrain.bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("sft", "dpo", "both"), default="both")
    parser.add_argument("--config", default=None, help="YAML preset (default: the kind's tiny preset)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--json", action="store_true", help="one JSON object per kind")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    rows = []
    for kind in (("sft", "dpo") if args.kind == "both" else (args.kind,)):
        config = load_config(args.config or _preset(kind), ["log.progress_bar=false", *args.overrides])
        row = measure(kind, config, args.steps, args.warmup)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'kind':5} {'device':>22} {'tokens/s':>12} {'trained tok/s':>14} {'step ms':>9} {'MFU':>7} "
              f"{'compile s':>10} {'J/token':>9} {'MHz':>5} {'capped':>6}")
        for r in rows:
            mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            jpt = f"{r['joules_per_token']:.2e}" if r["joules_per_token"] is not None else "-"
            mhz = f"{r['sm_clock_mhz']:.0f}" if r["sm_clock_mhz"] is not None else "-"
            capped = f"{100 * r['power_capped_frac']:.0f}%" if r["power_capped_frac"] is not None else "-"
            print(f"{r['kind']:5} {r['device'][:22]:>22} {r['tokens_per_second']:>12,.0f} "
                  f"{r['trained_tokens_per_second']:>14,.0f} {r['step_ms']:>9.1f} {mfu_text:>7} "
                  f"{r['compile_s']:>10.1f} {jpt:>9} {mhz:>5} {capped:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
