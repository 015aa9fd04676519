"""Tune the kernel dispatch for one model on this card: time every implementation of every kernel call it makes.

    python -m litespark_jax.autotune --config configs/llama-3.2-3b.yaml --out kernels-h100.json
    python -m litespark_jax.train --config configs/llama-3.2-3b.yaml model.kernel_table=kernels-h100.json

The calls are the ones the model's loss resolves with ``impl="auto"`` (recorded while tracing it, so the shapes are
exactly the training step's). For each, every implementation available here runs forward+backward on random
inputs; one whose outputs or gradients differ from the built-in ``auto`` choice's by more than ``--tolerance``
(relative L2) is not eligible; the fastest eligible one is the call's pick. Isolated timings can mislead (on an
H100 the 3B preset's picks made the whole step 0.9% slower: a kernel that wins alone may lose inside the step,
where XLA fuses around it and it shares the card), so then the step check trains a few steps with ``auto``'s rule
and with each differing pick alone, and a pick that does not speed up the whole step by ``--margin`` goes back to
the default (``kernel_best`` keeps what the isolated timing chose). The table (``pallas_kernels.tuned``) is written
with all the timings; ``auto`` then uses its choices for those exact calls on this device kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import tuned
from pallas_kernels._dispatch import record_calls
from pallas_kernels.bench.mlp import rel_err, time_ms

from litespark_jax.cli import ArgumentParser


def model_calls(config) -> list[tuple[str, dict]]:
    """The distinct ``(kernel, shape_info)`` the model's training loss resolves with ``impl="auto"``."""
    from litespark_jax.parallel.logical import use_rules
    from litespark_jax.parallel.mesh import DEFAULT_RULES, build_mesh
    from litespark_jax.train.state import abstract_model
    from litespark_jax.train.step import token_loss_sum

    graphdef, params = abstract_model(config.model)
    t = config.train
    micro = t.global_batch_size // t.grad_accum_steps
    ints = jax.ShapeDtypeStruct((micro, t.seq_len), jnp.int32)
    batch = {"inputs": ints, "targets": ints, "positions": ints, "segment_ids": ints,
             "loss_mask": jax.ShapeDtypeStruct((micro, t.seq_len), jnp.float32)}
    loss = lambda p, b: token_loss_sum(p, graphdef, b, z_loss_weight=t.z_loss_weight,
                                       impl=config.model.cross_entropy_impl)
    with use_rules(build_mesh(config.mesh), DEFAULT_RULES), record_calls() as calls:
        jax.eval_shape(loss, params, batch)
    seen, out = set(), []
    for kernel, impl, info in calls:
        key = (kernel, tuned.call_key(info))
        if impl == "auto" and key not in seen:
            seen.add(key)
            out.append((kernel, info))
    return out


def _inputs(kernel: str, info: dict, rng: np.random.Generator):
    """(positional arrays to differentiate, keyword arguments) for one call of ``kernel``."""
    dtype = jnp.dtype(info.get("dtype") or jnp.float32)
    normal = lambda shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, dtype)
    if kernel == "attention":
        q, kv = info["q_shape"], info["kv_shape"]
        seg = None
        if info.get("has_segments"):
            b, s = q[0], q[1]
            seg = jnp.asarray(np.repeat(np.arange(2), s // 2)[None].repeat(b, 0), jnp.int32)  # two documents a row
        return (normal(q), normal(kv), normal(kv)), {"segment_ids": seg, "causal": info.get("causal", True)}
    if kernel == "mlp":
        x, (d, two, f) = info["x_shape"], info["w_shape"]
        return (normal(x), normal((d, two, f), d ** -0.5), normal((f, d), f ** -0.5)), {}
    if kernel in ("cross_entropy", "cross_entropy_sum"):
        x, (d, v) = info["x_shape"], info["w_shape"]
        kwargs = {"targets": jnp.asarray(rng.integers(0, v, size=x[:-1]), jnp.int32)}
        if kernel == "cross_entropy_sum":  # the training loss: weighted by a loss mask
            kwargs["weights"] = jnp.asarray(rng.random(x[:-1]) > 0.1, jnp.float32)
        return (normal(x), normal((d, v), d ** -0.5)), kwargs
    if kernel == "rms_norm":
        x = info["x_shape"]
        return (normal(x), jnp.asarray(1.0 + 0.1 * rng.standard_normal(x[-1:]), jnp.float32)), {}
    raise ValueError(f"autotune: no input builder for kernel {kernel!r}")


def _forward_backward(fn, kwargs: dict):
    def run(args, cotangent_seed):
        out, vjp = jax.vjp(lambda *a: fn(*a, **kwargs), *args)
        cot = jax.random.normal(jax.random.key(cotangent_seed), out.shape, jnp.float32).astype(out.dtype)
        return (out, *vjp(cot))

    return jax.jit(run, static_argnums=1)


def tune_call(kernel: str, info: dict, *, iters: int, tolerance: float, seed: int = 0) -> dict:
    """Time every available implementation of one call; the entry for the table."""
    registry = pallas_kernels.registries()[kernel]
    default = registry.rule(**info)
    args, kwargs = _inputs(kernel, info, np.random.default_rng(seed))
    results, ms, errors = {}, {}, {}
    for name in [default, *(n for n in registry.names() if n != default)]:
        if not registry.available(name):
            continue
        try:
            run = _forward_backward(registry.resolve(name)[1], kwargs)
            results[name] = jax.block_until_ready(run(args, seed))
            ms[name] = round(time_ms(run, args, seed, iters=iters), 4)
        except Exception as e:  # noqa: BLE001 - an implementation that fails for this call is not eligible
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if default not in results:
        raise RuntimeError(f"autotune: the default {kernel} implementation {default!r} failed: {errors.get(default)}")
    eligible = {}
    for name, outs in results.items():
        err = max(rel_err(o, r) for o, r in zip(outs, results[default]))
        if err <= tolerance:
            eligible[name] = ms[name]
        else:
            errors[name] = f"differs from {default!r} by {err:.2e} (> {tolerance:g})"
    entry = {"kernel": kernel, "call": json.loads(tuned.call_key(info)), "best": min(eligible, key=eligible.get),
             "default": default, "ms": ms}
    if errors:
        entry["not_eligible"] = errors
    return entry


def step_check(config, table: dict, *, steps: int, warmup: int, margin: float) -> None:
    """Keep each pick that differs from ``auto``'s rule only if the training step is at least ``margin`` faster
    with it alone (same synthetic batch, one process); others fall back to the default. Edits ``table``."""
    from litespark_jax import bench

    changed = [e for e in table["entries"] if e["best"] != e["default"]]
    if not changed:
        return
    batch = bench.synthetic_batch(config)
    batch["segment_ids"] = np.ones_like(batch["inputs"])  # as in model_calls: the calls were recorded with packed rows

    def tokens_per_s(name: str, entries: list | None) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if entries is not None:
                path = os.path.join(tmp, "candidate.json")
                with open(path, "w") as f:
                    json.dump({**table, "entries": entries}, f)
            candidate = dataclasses.replace(config, model=dataclasses.replace(config.model, kernel_table=path))
            return bench.measure(name, candidate, batch, steps, warmup)["tokens_per_s"]

    try:
        base = tokens_per_s("auto", None)
        for e in changed:
            with record_calls() as calls:
                tps = tokens_per_s(f"{e['kernel']}={e['best']}", [e])
            if (e["kernel"], tuned.call_key(e["call"])) not in {(k, tuned.call_key(i)) for k, _, i in calls}:
                raise RuntimeError(f"autotune step check: the training step never made the tuned {e['kernel']} call "
                                   f"{e['call']}, so it cannot judge it (a bug: the step's batch differs from the "
                                   "one the calls were recorded with)")
            e["step_tokens_per_s"] = {e["default"]: round(base, 1), e["best"]: round(tps, 1)}
            verdict = "kept" if tps >= base * (1 + margin) else f"not kept (under +{margin:.1%}): {e['default']}"
            print(f"step check {e['kernel']}: auto {base:,.0f} tok/s, {e['best']} {tps:,.0f} "
                  f"({tps / base - 1:+.1%}): {verdict}", flush=True)
            if tps < base * (1 + margin):
                e["kernel_best"], e["best"] = e["best"], e["default"]
    finally:
        pallas_kernels.use_table(None)


def main(argv=None) -> int:
    from litespark_jax.cli import require_writable_file
    from litespark_jax.config import load_config

    parser = ArgumentParser(prog="python -m litespark_jax.autotune", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model preset whose kernel calls to tune")
    parser.add_argument("--out", required=True, help="where to write the table (JSON)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per implementation (median)")
    parser.add_argument("--tolerance", type=float, default=3e-2,
                        help="largest relative L2 difference from the default implementation's outputs and gradients")
    parser.add_argument("--step-check", action=argparse.BooleanOptionalAction, default=True,
                        help="time the training step with each pick that differs from auto's rule and keep only "
                             "those that make it faster")
    parser.add_argument("--step-steps", type=int, default=5, help="timed training steps per step-check variant")
    parser.add_argument("--margin", type=float, default=0.005,
                        help="how much faster (fraction) the step must be to keep a pick (run-to-run noise is ~0.5%%)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    if args.step_steps < 1 or args.iters < 1 or args.margin < 0 or args.tolerance < 0:
        parser.error("--iters and --step-steps must be >= 1, --margin and --tolerance >= 0")
    require_writable_file(parser, "--out", args.out)
    config = load_config(args.config, args.overrides)
    pallas_kernels.use_table(None)  # time against the built-in rule, not an older table
    entries = []
    for kernel, info in model_calls(config):
        entry = tune_call(kernel, info, iters=args.iters, tolerance=args.tolerance)
        timings = ", ".join(f"{n} {t:.3f}" for n, t in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
        print(f"{kernel} {entry['call']}: best {entry['best']} (auto {entry['default']}); ms: {timings}", flush=True)
        entries.append(entry)
    table = {"version": tuned.VERSION, "device_kind": tuned.device_kind(), "jax": jax.__version__,
             "config": args.config, "overrides": args.overrides, "entries": entries}
    if args.step_check:
        step_check(config, table, steps=args.step_steps, warmup=2, margin=args.margin)
    with open(args.out + ".tmp", "w") as f:  # then renamed: a failed write never leaves half a table
        json.dump(table, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    changed = sum(e["best"] != e["default"] for e in entries)
    print(f"wrote {args.out}: {len(entries)} calls, {changed} where the table differs from auto's rule")
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
