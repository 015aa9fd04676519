"""Tune the kernel dispatch for one model on this card: time every implementation of every kernel call it makes.

    python -m litespark_jax.autotune --config configs/llama-3.2-3b.yaml --out kernels-h100.json
    python -m litespark_jax.train --config configs/llama-3.2-3b.yaml model.kernel_table=kernels-h100.json

The calls are the ones the model's loss resolves with ``impl="auto"`` (recorded while tracing it, so the shapes are
exactly the training step's). For each, every implementation available here runs forward+backward on random
inputs; one whose outputs or gradients differ from the built-in ``auto`` choice's by more than ``--tolerance``
(relative L2) is not eligible; the fastest eligible one is written to the table (``pallas_kernels.tuned``), with
all the timings. ``auto`` then uses the table's choice for those exact calls on this device kind.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import tuned
from pallas_kernels._dispatch import record_calls
from pallas_kernels.bench.mlp import rel_err, time_ms


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
    if kernel == "cross_entropy":
        x, (d, v) = info["x_shape"], info["w_shape"]
        targets = jnp.asarray(rng.integers(0, v, size=x[:-1]), jnp.int32)
        return (normal(x), normal((d, v), d ** -0.5)), {"targets": targets}
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


def main(argv=None) -> int:
    from litespark_jax.config import load_config

    parser = argparse.ArgumentParser(prog="python -m litespark_jax.autotune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model preset whose kernel calls to tune")
    parser.add_argument("--out", required=True, help="where to write the table (JSON)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per implementation (median)")
    parser.add_argument("--tolerance", type=float, default=3e-2,
                        help="largest relative L2 difference from the default implementation's outputs and gradients")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
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
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    changed = sum(e["best"] != e["default"] for e in entries)
    print(f"wrote {args.out}: {len(entries)} calls, {changed} where the table differs from auto's rule")
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
