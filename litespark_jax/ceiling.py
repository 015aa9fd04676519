"""The power-limited ceiling of a training step: the MFU it would reach if it were nothing but its matmuls and its
attention, each running back to back at the rate the card sustains at its power limit.

    python -m litespark_jax.ceiling --config configs/llama-3.2-3b.yaml [--seconds 3] [--json ceiling.json]

An H100 SXM runs the 3B training step at its 700 W limit with the SM clock held at ~1400-1480 MHz, below the 1830
MHz its 989 TFLOP/s peak is quoted at (docs/PERFORMANCE.md). What a step can reach is bounded by what its work runs
at in that state, not by the nominal peak. This measures that bound: each GEMM shape of one layer's forward and
backward (input and weight gradients) and the vocabulary projection's three, and the attention forward+backward at
the step's shape, each dispatched back to back for ``--seconds`` after a warm-up long enough for the clock to settle
under the power limit. Their sustained rates give the time of a step that does only that work: no norm, residual
add, SwiGLU or RoPE pass, no loss statistics, optimizer update or weight cast. The MFU of that step is the ceiling
that no fusion or scheduling of the other work can pass, only doing less matmul work or drawing less power per FLOP.

GEMMs run as XLA emits them for ``jnp`` dot products (cuBLAS on a GPU), bf16 in and out with float32 accumulation,
as the step's are, except where the step runs its own kernel: on Hopper the gate|up forward is our Pallas kernel with
the SwiGLU epilogue, timed as well and counted in XLA's place (``--xla-gemms-only``: XLA's everywhere). Attention
runs through ``pallas_kernels.attention(impl=--attention)`` and is credited with the model FLOPs of causal
attention (the MFU convention's 6 x layers x d_model x seq per token). Model FLOPs follow
``metrics.model_flops_per_token``, whose 6 x parameters counts an untied input embedding that no GEMM computes, so
for untied models the ceiling reads a little high, as the MFU it bounds does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp

from litespark_jax.cli import ArgumentParser, require_positive, require_writable_file, run_main
from litespark_jax.config import ModelConfig, load_config
from litespark_jax.energy import EnergyWindow
from litespark_jax.metrics import model_flops_per_token, peak_tflops_per_device

ATTENTION_IMPLS = ("auto", "pallas", "cudnn", "reference")


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One matrix product of the step: [m, k] x [k, n], run ``count`` times per step. ``kind`` is how its operands
    lie: ``forward`` (X W), ``input_grad`` (dY W^T: contracts W's second axis) or ``weight_grad`` (X^T dY: contracts
    the token axis)."""

    name: str
    kind: str
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


def step_gemms(model: ModelConfig, tokens: int) -> list[Gemm]:
    """Every matmul of a training step over ``tokens`` tokens: per layer q, k, v, o, gate|up and down, and the
    vocabulary projection, each forward, input gradient and weight gradient. Products of one shape and kind are one
    entry (k and v share a shape), so each shape is timed once."""
    d, hd, f = model.d_model, model.resolved_head_dim, model.d_ff
    weights = [("q", d, model.num_heads * hd, 1), ("kv", d, model.num_kv_heads * hd, 2),
               ("o", model.num_heads * hd, d, 1), ("gate_up", d, 2 * f, 1), ("down", f, d, 1)]
    gemms = []
    for name, fan_in, fan_out, per_layer in weights:
        count = per_layer * model.num_layers
        gemms += [Gemm(name, "forward", tokens, fan_in, fan_out, count),
                  Gemm(name, "input_grad", tokens, fan_out, fan_in, count),
                  Gemm(name, "weight_grad", fan_in, tokens, fan_out, count)]
    v = model.vocab_size
    gemms += [Gemm("vocab", "forward", tokens, d, v, 1), Gemm("vocab", "input_grad", tokens, v, d, 1),
              Gemm("vocab", "weight_grad", d, tokens, v, 1)]
    return gemms


def _gemm_program(gemm: Gemm):
    """(jitted product, its two bf16 operands) laid out as the step holds them: activations [tokens, features],
    weights [fan_in, fan_out]."""
    keys = jax.random.split(jax.random.key(0), 2)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)  # noqa: E731
    if gemm.kind == "forward":  # X [m, k] . W [k, n]
        a, b, dims = normal(keys[0], (gemm.m, gemm.k)), normal(keys[1], (gemm.k, gemm.n)), (((1,), (0,)), ((), ()))
    elif gemm.kind == "input_grad":  # dY [m, k] . W[n, k]^T
        a, b, dims = normal(keys[0], (gemm.m, gemm.k)), normal(keys[1], (gemm.n, gemm.k)), (((1,), (1,)), ((), ()))
    elif gemm.kind == "weight_grad":  # X[k, m]^T . dY [k, n]
        a, b, dims = normal(keys[0], (gemm.k, gemm.m)), normal(keys[1], (gemm.k, gemm.n)), (((0,), (0,)), ((), ()))
    else:
        raise ValueError(f"unknown GEMM kind {gemm.kind!r}")
    product = jax.jit(lambda x, y: jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32
                                                        ).astype(jnp.bfloat16))
    return product, (a, b)


def _attention_program(model: ModelConfig, batch: int, seq: int, impl: str):
    from pallas_kernels.attention import attention

    keys = jax.random.split(jax.random.key(1), 4)
    hd = model.resolved_head_dim
    q = jax.random.normal(keys[0], (batch, seq, model.num_heads, hd), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, model.num_kv_heads, hd), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, model.num_kv_heads, hd), jnp.bfloat16)
    do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=True, impl=impl), q, k, v)
        return out, vjp(do)

    return jax.jit(fwd_bwd), (q, k, v, do)


def sustained(fn, args, seconds: float, warmup_seconds: float) -> dict:
    """Run ``fn(*args)`` back to back: ``warmup_seconds`` untimed (compilation, then the clock settling under the
    power limit), then whole batches of calls until ``seconds`` have passed. Returns seconds per call, watts, and
    the median SM clock and power-capped share over the timed window (None without NVML)."""
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    calls_per_batch = 1
    while True:  # grow the batch until one takes ~1/10 of the window, so the host's dispatch stays ahead
        t = time.perf_counter()
        out = None
        for _ in range(calls_per_batch):
            out = fn(*args)
        jax.block_until_ready(out)
        took = time.perf_counter() - t
        if time.perf_counter() - t0 >= warmup_seconds and took >= seconds / 10:
            break
        if took < seconds / 10:
            calls_per_batch *= 2
    window = EnergyWindow(clock_interval_s=0.05)
    window.start()
    t, calls = time.perf_counter(), 0
    while True:
        for _ in range(calls_per_batch):
            out = fn(*args)
        calls += calls_per_batch
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t
        if elapsed >= seconds:
            break
    _, watts = window.stop()
    return {"s_per_call": elapsed / calls, "calls": calls, "watts": watts, "sm_clock_mhz": window.sm_clock_mhz,
            "power_capped": window.power_capped}


def _step_gate_up_program(tokens: int, model: ModelConfig):
    """The step's own gate|up forward on Hopper: the Pallas kernel with the SwiGLU epilogue (``mlp`` impl ``auto``
    there), writing h as well as gate|up; None where the step would use XLA's product."""
    from pallas_kernels._dispatch import is_hopper
    from pallas_kernels.mlp import mosaic_gpu

    if not is_hopper() or not mosaic_gpu.supported(tokens, model.d_model, model.d_ff, dtype=jnp.bfloat16):
        return None
    keys = jax.random.split(jax.random.key(2), 2)
    x = jax.random.normal(keys[0], (tokens, model.d_model), jnp.bfloat16)
    w = jax.random.normal(keys[1], (model.d_model, 2, model.d_ff), jnp.bfloat16)
    return jax.jit(mosaic_gpu.swiglu_gate_up), (x, w)


def _row(name, kind, m, k, n, count, flops_per_call, run, in_ceiling=True) -> dict:
    return {"name": name, "kind": kind, "m": m, "k": k, "n": n, "count": count,
            "tflops": flops_per_call / run["s_per_call"] / 1e12, "step_ms": run["s_per_call"] * count * 1e3,
            "in_ceiling": in_ceiling, **run}


def measure(model: ModelConfig, batch: int, seq: int, seconds: float, warmup_seconds: float, attention_impl: str,
            peak_tflops: float | None, progress=None, step_kernels: bool = True) -> dict:
    """Sustained rate of every GEMM and of the attention, and the step they bound (see the module docstring). With
    ``step_kernels``, a product the step runs as our own kernel (the gate|up forward on Hopper) is timed that way
    too and counts in the ceiling instead of XLA's (whose row stays, ``in_ceiling`` false)."""
    tokens = batch * seq
    rows = []

    def add(row):
        rows.append(row)
        if progress:
            progress(row)

    gemms = step_gemms(model, tokens)
    for gemm in gemms:
        fn, args = _gemm_program(gemm)
        add(_row(gemm.name, gemm.kind, gemm.m, gemm.k, gemm.n, gemm.count, gemm.flops / gemm.count,
                 sustained(fn, args, seconds, warmup_seconds)))
    step_gate_up = _step_gate_up_program(tokens, model) if step_kernels else None
    if step_gate_up is not None:
        xla_row = next(r for r in rows if r["name"] == "gate_up" and r["kind"] == "forward")
        xla_row["in_ceiling"] = False
        add(_row("gate_up", "forward, step's kernel", tokens, model.d_model, 2 * model.d_ff, model.num_layers,
                 2.0 * tokens * model.d_model * 2 * model.d_ff, sustained(*step_gate_up, seconds, warmup_seconds)))
    fn, args = _attention_program(model, batch, seq, attention_impl)
    attention_flops = 6.0 * model.d_model * seq * batch * seq  # one layer, causal, forward + backward
    add(_row("attention", f"fwd+bwd ({attention_impl})", batch, seq, model.num_heads, model.num_layers,
             attention_flops, sustained(fn, args, seconds, warmup_seconds)))
    step_flops = model_flops_per_token(model, seq) * tokens
    gemm_flops = sum(g.flops for g in gemms)
    gemm_ms = sum(r["step_ms"] for r in rows if r["in_ceiling"] and r["name"] != "attention")
    ceiling_s = sum(r["step_ms"] for r in rows if r["in_ceiling"]) / 1e3
    ceiling_tflops = step_flops / ceiling_s / 1e12
    return {"device": jax.devices()[0].device_kind, "batch": batch, "seq_len": seq, "tokens": tokens,
            "step_model_tflop": step_flops / 1e12, "gemm_tflop": gemm_flops / 1e12,
            "gemm_tflops_sustained": gemm_flops / (gemm_ms / 1e3) / 1e12,
            "ceiling_step_s": ceiling_s, "ceiling_tokens_per_s": tokens / ceiling_s,
            "ceiling_tflops": ceiling_tflops,
            "ceiling_mfu": ceiling_tflops / peak_tflops if peak_tflops else None,
            "peak_tflops": peak_tflops, "rows": rows}


def _fmt_row(row: dict) -> str:
    mhz = f"{row['sm_clock_mhz']:.0f}" if row["sm_clock_mhz"] is not None else "-"
    capped = f"{100 * row['power_capped']:.0f}%" if row["power_capped"] is not None else "-"
    watts = f"{row['watts']:.0f}" if row["watts"] is not None else "-"
    return (f"{row['name']:<10}{row['kind']:<24}{row['m']:>7}{row['k']:>7}{row['n']:>8}{row['count']:>4}"
            f"{row['tflops']:>9.1f}{row['step_ms']:>10.2f}{watts:>6}{mhz:>6}{capped:>8}"
            + ("" if row["in_ceiling"] else "  (not in the ceiling: the step runs its own kernel)"))


HEADER = (f"{'product':<10}{'kind':<24}{'m':>7}{'k':>7}{'n':>8}{'x':>4}{'TFLOP/s':>9}{'ms/step':>10}{'W':>6}"
          f"{'MHz':>6}{'capped':>8}")


def format_summary(result: dict) -> str:
    mfu = f"{100 * result['ceiling_mfu']:.1f}%" if result["ceiling_mfu"] is not None else "- (no known peak)"
    return "\n".join([
        f"step of {result['batch']} x {result['seq_len']} tokens: {result['step_model_tflop']:.1f} model TFLOP "
        f"({result['gemm_tflop']:.1f} in GEMMs at {result['gemm_tflops_sustained']:.1f} TFLOP/s sustained)",
        f"ceiling (GEMMs + attention only, sustained): {result['ceiling_step_s']:.3f} s/step, "
        f"{result['ceiling_tokens_per_s']:,.0f} tok/s, {result['ceiling_tflops']:.1f} TFLOP/s, MFU {mfu}"])


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.ceiling", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model preset, e.g. configs/llama-3.2-3b.yaml")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per product (default 3)")
    parser.add_argument("--warmup-seconds", type=float, default=2.0,
                        help="untimed seconds per product first, for the clock to settle (default 2)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                        help="attention implementation to time (default auto: ours on Hopper)")
    parser.add_argument("--xla-gemms-only", action="store_true",
                        help="time every product as XLA emits it, also where the step runs our own kernel (the "
                             "gate|up forward on Hopper)")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.global_batch_size=8")
    args = parser.parse_intermixed_args(argv)
    require_positive(parser, args, "seconds", "warmup_seconds")
    require_writable_file(parser, "--json", args.json)
    config = load_config(args.config, args.overrides)
    train = config.train
    batch = train.global_batch_size // train.grad_accum_steps // jax.device_count()
    if batch < 1:
        parser.error(f"train.global_batch_size {train.global_batch_size} gives no sequence per device "
                     f"({train.grad_accum_steps} micro-batches, {jax.device_count()} devices)")
    print(f"device: {jax.devices()[0].device_kind}; one micro-batch of {batch} x {train.seq_len} per device; "
          f"{args.seconds:g} s per product after {args.warmup_seconds:g} s of warm-up", flush=True)
    print(HEADER, flush=True)
    result = measure(config.model, batch, train.seq_len, args.seconds, args.warmup_seconds, args.attention,
                     peak_tflops_per_device(train.peak_tflops_per_device),
                     progress=lambda row: print(_fmt_row(row), flush=True), step_kernels=not args.xla_gemms_only)
    print(format_summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
