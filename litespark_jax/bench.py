"""End-to-end training throughput, LiteSpark against the baseline a competent JAX user writes, in one process.

    python -m litespark_jax.bench --config configs/llama-3.2-3b.yaml --baseline

Both variants train the same model on the same tokens from the same initial state. The baseline uses
``jax.nn.dot_product_attention`` with cuDNN, full remat, and the plain (unfused) MLP, norm and loss; LiteSpark uses
the config as given (``impl=auto`` kernels, its remat policy, micro-batch), optionally with ``--litespark`` overrides.
Printed per variant: tokens/s, model TFLOP/s per device, MFU (causal and non-causal FLOP conventions), step time,
peak device memory, compile time, average GPU power and joules per token, the median SM clock and the share of the
timed steps the power limit held it down (NVML), then the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import jax
import numpy as np

import pallas_kernels
from pallas_kernels.attention import cudnn as cudnn_attention
from litespark_jax import trace_summary
from litespark_jax.cli import ArgumentParser, require_at_least, require_writable_file, run_main
from litespark_jax.config import Config, load_config
from litespark_jax.energy import EnergyWindow
from litespark_jax.metrics import model_flops_per_token, peak_tflops_per_device
from litespark_jax.parallel.logical import use_rules
from litespark_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, build_mesh, check_shapes, mesh_shape
from litespark_jax.train.offload import build_train_step, compile_ahead
from litespark_jax.train.optimizer import build_optimizer
from litespark_jax.train.state import abstract_model, init_train_state, state_shardings
from litespark_jax.train.step import compiler_options, make_gradients


def baseline_overrides(model=None, seq_len: int | None = None) -> list[str]:
    """The baseline's settings. A function, not a constant: asking for the backend at import time would start it
    before ``run_main`` sets the GPU memory fraction (it did, and capped every bench step at 75% of the card).

    Attention is cuDNN's where there is a GPU and cuDNN takes the ``model``'s inputs at ``seq_len`` (16-bit, a head
    dim it supports, an even length). Otherwise, on CPU (smoke tests) or for a float32 model, XLA's attention (the
    reference) stands in, as it would for a user of ``jax.nn.dot_product_attention``."""
    cudnn = jax.default_backend() == "gpu"
    if cudnn and model is not None:
        shape = (1, seq_len, model.num_heads, model.resolved_head_dim) if seq_len else (model.resolved_head_dim,)
        cudnn = cudnn_attention.supports(shape, model.dtype) is None
    return [f"model.attention_impl={'cudnn' if cudnn else 'reference'}", *_BASELINE_REST]


_BASELINE_REST = [
    "model.mlp_impl=reference",
    "model.cross_entropy_impl=reference",
    "model.rms_norm_impl=reference",
    "model.remat_policy=full",
    "model.scan_layers=true",  # the usual lax.scan over layers (as before the presets unrolled theirs)
    "optim.state_dtype=float32",
]


def synthetic_batch(config: Config, seed: int = 0, mean_doc_len: int | None = None) -> dict:
    """Random tokens, the same array for every variant: one document per row, or with ``mean_doc_len`` rows packed
    with documents of ``mean_doc_len / 2`` to ``3 * mean_doc_len / 2`` tokens (the last one cut at the row's end),
    with segment ids and per-document positions as the data pipeline's packing gives them."""
    t = config.train
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.model.vocab_size, size=(t.global_batch_size, t.seq_len + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), (t.global_batch_size, t.seq_len))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.ascontiguousarray(positions),
             "loss_mask": np.ones((t.global_batch_size, t.seq_len), np.float32)}
    if mean_doc_len is None:
        return batch
    segment_ids = np.zeros((t.global_batch_size, t.seq_len), np.int32)
    for row in range(t.global_batch_size):
        start, doc = 0, 1
        while start < t.seq_len:
            end = min(t.seq_len, start + int(rng.integers(max(1, mean_doc_len // 2), 3 * mean_doc_len // 2 + 1)))
            segment_ids[row, start:end] = doc
            batch["positions"][row, start:end] = np.arange(end - start)
            start, doc = end, doc + 1
    batch["segment_ids"] = segment_ids
    return batch


PROFILED_STEPS = 2


def measure(name: str, config: Config, batch: dict, steps: int, warmup: int, compile_only: bool = False,
            profile_dir: str | None = None) -> dict:
    """Compile and time ``steps`` optimizer steps of ``config`` on ``batch``; with ``profile_dir``, then trace
    ``PROFILED_STEPS`` more into ``profile_dir/name`` and print where their device time went."""
    if batch["inputs"].shape != (config.train.global_batch_size, config.train.seq_len):
        raise ValueError(f"{name}: batch {batch['inputs'].shape} is not the config's "
                         f"{config.train.global_batch_size} x {config.train.seq_len}")
    mesh, rules = build_mesh(config.mesh), DEFAULT_RULES
    check_shapes(config, mesh, rules)  # the trainer's one-line errors, not a sharding traceback
    pallas_kernels.use_table(config.model.kernel_table)  # per variant: None resets what another variant loaded
    optimizer = build_optimizer(config.optim, config.train.steps)
    graphdef, abstract_params = abstract_model(config.model)
    state_sharding = state_shardings(optimizer, abstract_params, mesh, rules, config.optim.offload_state)

    with use_rules(mesh, rules):
        state = jax.jit(lambda: init_train_state(config.model, optimizer, config.train.seed),
                        out_shardings=state_sharding)()
        data_sharding = batch_sharding(mesh, rules)
        device_batch = {k: jax.device_put(v, data_sharding) for k, v in batch.items()}
        step_fn = build_train_step(config, make_gradients(config, graphdef), optimizer, None, state_sharding,
                                   data_sharding, compiler_options(config))
        start = time.perf_counter()
        compiled, memory = compile_ahead(step_fn, state, device_batch)
        compile_seconds = time.perf_counter() - start
    if compile_only:
        gib = lambda b: round(b / 2**30, 2)
        row = {"variant": name, "compile_s": round(compile_seconds, 1),
               "argument_gib": gib(memory.argument_size_in_bytes), "output_gib": gib(memory.output_size_in_bytes),
               "alias_gib": gib(memory.alias_size_in_bytes), "temp_gib": gib(memory.temp_size_in_bytes)}
        row["total_gib"] = round(row["argument_gib"] + row["output_gib"] - row["alias_gib"] + row["temp_gib"], 2)
        print(row, flush=True)
        return row
    for _ in range(warmup):
        state, metrics = compiled(state, device_batch)
    jax.block_until_ready(state)
    energy = EnergyWindow(clock_interval_s=0.1)
    energy.start()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, device_batch)
    loss = float(metrics["loss"])
    elapsed = time.perf_counter() - start
    joules, watts = energy.stop()
    stats = jax.devices()[0].memory_stats() or {}
    if profile_dir:
        trace_dir = os.path.join(profile_dir, name)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(PROFILED_STEPS):
                state, metrics = compiled(state, device_batch)
            jax.block_until_ready(metrics["loss"])
        summary = trace_summary.summarize_trace(trace_dir, PROFILED_STEPS)
        print(f"# {name}: profile ({trace_dir})\n{trace_summary.format_summary(summary)}", flush=True)
    del state, device_batch
    gc.collect()

    t, n_dev = config.train, jax.device_count()
    tokens = t.global_batch_size * t.seq_len
    tps = tokens * steps / elapsed
    peak = peak_tflops_per_device(t.peak_tflops_per_device)
    flops_causal = model_flops_per_token(config.model, t.seq_len, causal=True)
    flops_full = model_flops_per_token(config.model, t.seq_len, causal=False)
    tflops = tps * flops_causal / n_dev / 1e12
    compiled_bytes = None
    if memory is not None:
        compiled_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                          - memory.alias_size_in_bytes)
    return {
        "variant": name,
        "devices": n_dev,
        "mesh": mesh_shape(config.mesh, n_dev),
        "global_batch": t.global_batch_size,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / n_dev,
        "tflops_per_device": tflops,
        "mfu_causal": tflops / peak if peak else None,
        "mfu_noncausal": tps * flops_full / n_dev / 1e12 / peak if peak else None,
        "step_s": elapsed / steps,
        "compiled_memory_gib": compiled_bytes / 2**30 if compiled_bytes is not None else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
        "compile_s": compile_seconds,
        "avg_power_w": watts / energy.meter.device_count if watts else None,
        "joules_per_token": joules / (tokens * steps) if joules else None,
        "sm_clock_mhz": energy.sm_clock_mhz,
        "power_capped_frac": energy.power_capped,
        "final_loss": loss,
    }


def split_top_level(text: str) -> list[str]:
    """Split ``a=1,b=[x, y],c={k: v, w: z}`` at the commas outside brackets and braces (they belong to values)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


CURVE_OVERRIDES = ["train.eval_every=0", "log.progress_bar=false", "log.tensorboard=false", "log.every=1",
                   "checkpoint.every=0"]


def loss_curves(config_path: str, specs: list[tuple[str, list[str]]], steps: int,
                run_root: str) -> dict[str, np.ndarray]:
    """Train every variant (name, overrides) ``steps`` steps on the configured data (the bundled corpus by default)
    from the same seed through the real training loop; the per-step losses of each."""
    from litespark_jax.train.loop import train

    curves = {}
    for name, overrides in specs:
        config = load_config(config_path, [*overrides, *CURVE_OVERRIDES, f"train.steps={steps}",
                                           f"train.run_dir={os.path.join(run_root, name)}"])
        print(f"# {name}: {steps} steps on {config.data.train_files}", flush=True)
        curves[name] = np.array([h["loss"] for h in train(config).history])
        gc.collect()
        if len(curves[name]) < steps:  # the loop saved and left early (a SIGTERM, e.g. a timeout)
            print(f"# {name}: stopped after {len(curves[name])} of {steps} steps; no further variants", flush=True)
            break
    return curves


CURVE_TOLERANCE = 0.02  # |final loss gap| counted as bf16 noise (the goal in docs/PERFORMANCE.md)
RERUN = "baseline-rerun"


def print_curves(curves: dict[str, np.ndarray]) -> float:
    """Print the losses every tenth of the run and each variant's gap to the baseline; returns the largest final gap.

    With a ``baseline-rerun`` curve (``--curve-noise``: the baseline trained again, same seed and data), its gap to
    the baseline is the run-to-run noise of the setup itself (nonzero where the backend is not run-to-run
    deterministic, as XLA on the GPU by default), and each variant is judged against the larger of that and
    ``CURVE_TOLERANCE``.
    """
    names = list(curves)
    steps = min(len(c) for c in curves.values())
    if steps < max(len(c) for c in curves.values()):
        print(f"# comparing the first {steps} steps, which every variant ran")
        curves = {n: c[:steps] for n, c in curves.items()}
    print("step " + " ".join(f"{n:>14}" for n in names))
    for i in sorted({*range(0, steps, max(steps // 10, 1)), steps - 1}):
        print(f"{i + 1:>4} " + " ".join(f"{curves[n][i]:>14.4f}" for n in names))
    gap = 0.0
    if "baseline" not in curves:
        return gap
    noise = abs(curves[RERUN][-1] - curves["baseline"][-1]) if RERUN in curves else None
    for n in names:
        if n == "baseline":
            continue
        d = curves[n] - curves["baseline"]
        line = (f"{n} - baseline: final {d[-1]:+.4f}, mean of the last 10 steps {d[-10:].mean():+.4f}, "
                f"largest {np.abs(d).max():.4f}")
        if n == RERUN:
            line += "  (the noise floor)"
        else:
            gap = max(gap, abs(d[-1]))
            if noise is not None:
                bound = max(CURVE_TOLERANCE, noise)
                verdict = "within" if abs(d[-1]) <= bound else "OUTSIDE"
                line += f"  -> {verdict} max({CURVE_TOLERANCE}, noise {noise:.4f})"
        print(line)
    return gap


def _fmt(value, spec):
    """``value`` formatted by ``spec`` (e.g. '>8.2f'); a missing value (no NVML, no memory stats) as "n/a" in the
    same width, so the columns stay aligned."""
    if value is None:
        return format("n/a", ">" + spec.lstrip("<>^").split(".")[0])
    return format(value, spec)


def _pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def print_table(rows: list[dict]) -> None:
    """One line per variant; TFLOP/s, MFU, memory and watts are per device, tok/s and J/tok for the whole job."""
    per_device = any(r["devices"] > 1 for r in rows)
    header = (f"{'variant':<12} {'tok/s':>10} " + (f"{'tok/s/GPU':>9} " if per_device else "")
              + f"{'TFLOP/s':>8} {'MFU':>6} {'MFU(nc)':>7} {'step s':>7} "
              f"{'mem GiB':>8} {'compile':>7} {'W':>6} {'J/tok':>7} {'MHz':>5} {'capped':>6} {'loss':>7}")
    print(header)
    for r in rows:
        print(f"{r['variant']:<12} {r['tokens_per_s']:>10,.0f} "
              + (f"{r['tokens_per_s_per_device']:>9,.0f} " if per_device else "") + f"{r['tflops_per_device']:>8.1f} "
              f"{_pct(r['mfu_causal']):>6} {_pct(r['mfu_noncausal']):>7} {r['step_s']:>7.3f} "
              f"{_fmt(r['compiled_memory_gib'], '>8.2f')} {r['compile_s']:>6.1f}s {_fmt(r['avg_power_w'], '>6.0f')} "
              f"{_fmt(r['joules_per_token'], '>7.4f')} {_fmt(r.get('sm_clock_mhz'), '>5.0f')} "
              f"{_pct(r.get('power_capped_frac')):>6} {r['final_loss']:>7.3f}")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model preset, e.g. configs/llama-3.2-3b.yaml")
    parser.add_argument("--baseline", action="store_true", help="also run the baseline step (last) and the ratios")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--litespark", nargs="*", default=[], metavar="section.key=value",
                        help="overrides applied to the LiteSpark variant only")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,key=value",
                        help="an extra named LiteSpark variant (repeatable), e.g. accum2:train.grad_accum_steps=2 or "
                             "lhs:train.xla_options={xla_gpu_enable_latency_hiding_scheduler: true}")
    parser.add_argument("--docs", type=int, default=None, metavar="MEAN_TOKENS",
                        help="pack each row with documents of about this many tokens (segment ids and positions per "
                             "document, as packed training data has); default: one document per row, no segment ids")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile each variant and print XLA's memory analysis")
    parser.add_argument("--jsonl", default=None, help="append result rows to this JSONL file")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help=f"after timing, trace {PROFILED_STEPS} steps of each variant into DIR/<variant> and "
                             "print a summary of their device time (python -m litespark_jax.trace_summary)")
    parser.add_argument("--curve-steps", type=int, default=0, metavar="N",
                        help="instead of timing, train each variant N steps on the configured data (the bundled "
                             "corpus by default) from the same seed and compare the loss curves")
    parser.add_argument("--curve-dir", default=None, help="run directories of --curve-steps (default: a temp dir)")
    parser.add_argument("--curve-noise", action="store_true",
                        help=f"with --curve-steps and --baseline: train the baseline twice ({RERUN!r}) to measure "
                             "the setup's own run-to-run noise and judge each gap against it")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for both variants")
    args = parser.parse_intermixed_args(argv)
    require_at_least(parser, args, steps=1, warmup=0, curve_steps=0, docs=1)
    require_writable_file(parser, "--jsonl", args.jsonl)
    if args.compile_only and (args.jsonl or args.profile):
        parser.error("--jsonl and --profile need timed steps; --compile-only times none")
    # (name, overrides) per variant; the config is built from them (again for --curve-steps, with its settings).
    specs = [("litespark", [*args.overrides, *args.litespark])]
    for spec in args.variant:
        name, colon, overrides = spec.partition(":")
        problem = ("a name is missing" if not name else
                   "no overrides after NAME: (it would time the preset again)" if not colon or not overrides.strip()
                   else f"the name {name!r} holds '='; write NAME:key=value" if "=" in name else
                   f"the name {name!r} is taken" if name in {n for n, _ in specs} | {"baseline", RERUN} else None)
        if problem:
            parser.error(f"--variant {spec}: {problem} (NAME:key=value,key=value)")
        specs.append((name, [*args.overrides, *filter(None, split_top_level(overrides))]))
    if args.docs and args.curve_steps:
        parser.error("--docs packs the timed steps' synthetic batch; --curve-steps trains on the configured data")
    if args.curve_noise and not (args.curve_steps and args.baseline):
        parser.error("--curve-noise needs --curve-steps N and --baseline")
    if args.baseline:
        # Last, so the variants that need the most memory get an unfragmented allocator; same tokens either way.
        base = load_config(args.config, args.overrides)
        specs.append(("baseline", [*args.overrides, *baseline_overrides(base.model, base.train.seq_len)]))
        if args.curve_noise:
            specs.append((RERUN, specs[-1][1]))
    variants = [(name, load_config(args.config, overrides)) for name, overrides in specs]
    if args.curve_steps:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            curves = loss_curves(args.config, specs, args.curve_steps, args.curve_dir or tmp)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                for name, losses in curves.items():
                    f.write(json.dumps({"config": args.config, "time": time.time(), "variant": name,
                                        "curve": [round(float(x), 5) for x in losses]}) + "\n")
        print_curves(curves)
        return 0
    batches = {}  # one synthetic batch per (batch size, sequence length): variants may change either
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}"
          + (f"; rows packed with documents of ~{args.docs} tokens" if args.docs else ""), flush=True)
    rows = []
    for name, config in variants:
        m = config.model
        print(f"# {name}: attention={m.attention_impl} mlp={m.mlp_impl} loss={m.cross_entropy_impl} "
              f"norm={m.rms_norm_impl} remat={m.remat_policy} batch={config.train.global_batch_size}x"
              f"{config.train.seq_len} accum={config.train.grad_accum_steps}"
              + (f" xla_options={config.train.xla_options}" if config.train.xla_options else "")
              + (" offload_state" if config.optim.offload_state else ""), flush=True)
        shape = (config.train.global_batch_size, config.train.seq_len)
        if shape not in batches:  # same seed: a larger batch's first rows are the smaller one's
            batches[shape] = synthetic_batch(config, mean_doc_len=args.docs)
        try:
            rows.append(measure(name, config, batches[shape], args.steps, args.warmup, args.compile_only,
                                args.profile))
        except jax.errors.JaxRuntimeError as e:  # out of memory: report it and measure the other variants
            print(f"# {name}: failed: {str(e).splitlines()[0][:160]}", flush=True)
            gc.collect()
    if args.compile_only:
        return 0
    print_table(rows)
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    if base is not None:
        for ours in (r for r in rows if r is not base):
            line = f"ratios {ours['variant']}/baseline: tokens/s {ours['tokens_per_s'] / base['tokens_per_s']:.3f}x"
            if base["joules_per_token"] and ours["joules_per_token"]:
                line += f", joules/token {ours['joules_per_token'] / base['joules_per_token']:.3f}x"
            print(line)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            overrides = dict(specs)
            for row in rows:  # with its overrides, so a row can be re-planned (python -m litespark_jax.plan)
                f.write(json.dumps({"config": args.config, "overrides": overrides[row["variant"]], "time": time.time(),
                                    **({"mean_doc_len": args.docs} if args.docs else {}), **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
