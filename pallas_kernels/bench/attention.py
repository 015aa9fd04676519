"""Attention benchmark: TFLOP/s forward and forward+backward for pallas (Hopper), cudnn and the XLA reference.

FLOP convention: forward = 4 * B * S * S * H * D (two matmuls), halved when causal; the backward does 2.5x the
forward's matmul work (five matmuls), so forward+backward = 3.5x forward. Times: jitted function, warm-up calls,
then the median of ``iters`` timed calls, each ended by ``block_until_ready`` (``*_ms``), and, beside it, the
median over rounds of the per-call time of calls dispatched back to back (``*_stream_ms``, ``mlp.stream_ms``: the
host's dispatch hidden behind the device's work, as in a training step). Error: relative L2 error
||x - ref|| / ||ref|| against the float32 reference on upcast inputs, for the output and dq/dk/dv, computed on
batch element 0 (to keep the reference's S x S scores in memory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.bench.mlp import stream_ms, time_ms

# (name, batch, seq, heads, kv_heads, head_dim, causal, segments): segments None (no segment ids), "docs" (rows
# packed with documents of 256-2048 tokens) or "one-doc" (segment ids holding one document per row: the cost of the
# segment path itself, against the same shape without ids)
SHAPES = [
    ("llama-8b-s4k", 4, 4096, 32, 8, 128, True, None),
    ("llama-8b-s8k", 2, 8192, 32, 8, 128, True, None),
    ("d64-s4k", 4, 4096, 32, 8, 64, True, None),
    ("llama-3b-s4k", 4, 4096, 24, 8, 128, True, None),
    ("llama-3b-s2k", 8, 2048, 24, 8, 128, True, None),
    ("llama-8b-s4k-docs", 4, 4096, 32, 8, 128, True, "docs"),
    ("llama-3b-s4k-onedoc", 4, 4096, 24, 8, 128, True, "one-doc"),
    ("llama-8b-s8k-onedoc", 2, 8192, 32, 8, 128, True, "one-doc"),
    ("llama-8b-s4k-full", 4, 4096, 32, 8, 128, False, None),
]
QUICK = ["llama-8b-s4k", "llama-8b-s8k"]


def _impls():
    """The implementations to time: ``ATTN_BENCH_IMPLS`` (comma-separated, or semicolon-separated when a name holds
    a colon: ``pallas:{"field": value}`` is the Pallas kernel with those ``mosaic_gpu.Config`` fields changed, e.g.
    ``pallas:{"bwd_steps": 3}``), else pallas (on Hopper), cudnn and the reference."""
    from pallas_kernels._dispatch import is_hopper

    names = ["cudnn", "reference"]
    if is_hopper():
        names.insert(0, "pallas")
    env = os.environ.get("ATTN_BENCH_IMPLS")
    return _impl_list(env) if env else names


def _attention_fn(impl):
    """``attention(q, k, v, segment_ids=..., causal=...)`` for one bench implementation name."""
    from pallas_kernels.attention import attention, mosaic_gpu

    if impl.startswith("pallas:"):
        fields = json.loads(impl[len("pallas:"):])
        return lambda q, k, v, **kw: mosaic_gpu.attention(
            q, k, v, config=dataclasses.replace(mosaic_gpu.default_config(q.shape[-1], q.shape[1]), **fields), **kw)
    return lambda q, k, v, **kw: attention(q, k, v, impl=impl, **kw)


def _time(fn, args, iters, warmup=2):
    """Median seconds of ``fn(*args)`` (the shared ``time_ms``)."""
    return time_ms(fn, *args, iters=iters, warmup=warmup) / 1e3


def _docs(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, doc = 0, 1
        while pos < seq:
            n = int(rng.integers(256, 2048))
            out[b, pos:pos + n] = doc
            pos += n
            doc += 1
    return jnp.asarray(out)


def make_inputs(b, s, h, kvh, d, docs):
    """(q, k, v, segment ids or None, dO): bf16 random normal; segment ids of packed documents when ``docs`` is
    "docs", of one document per row when it is "one-doc"."""
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.bfloat16)
    if docs == "docs":
        seg = _docs(b, s)
    elif docs == "one-doc":
        seg = jnp.ones((b, s), jnp.int32)
    elif docs is None:
        seg = None
    else:
        raise ValueError(f"segments {docs!r}: expected None, 'docs' or 'one-doc'")
    return q, k, v, seg, do


def jitted_fwd_bwd(attn, causal):
    """``jit`` of ``(q, k, v, seg, do) -> (out, (dq, dk, dv))`` for one bench implementation's ``attn``."""

    def fwd_bwd(q, k, v, seg, do):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, segment_ids=seg, causal=causal), q, k, v)
        return out, vjp(do)

    return jax.jit(fwd_bwd)


def _impl_list(text):
    """Implementation names: semicolon-separated (needed when one holds a colon, ``pallas:{...}``, whose JSON may
    hold commas), else comma-separated; one name with a colon and no semicolon is that one name."""
    if ";" in text:
        return text.split(";")
    return [text] if ":" in text else text.split(",")


def _rel(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def run(args) -> list[dict]:
    from pallas_kernels.attention import reference

    quick = getattr(args, "quick", False)
    only = os.environ.get("ATTN_BENCH_SHAPES")
    iters = 3 if quick else 5
    rounds = 2 if quick else 3
    device = jax.devices()[0].device_kind
    rows = []
    for name, b, s, h, kvh, d, causal, docs in SHAPES:
        if only and name not in only.split(","):
            continue
        if quick and not only and name not in QUICK:
            continue
        q, k, v, seg, do = make_inputs(b, s, h, kvh, d, docs)
        fwd_flops = 4 * b * s * s * h * d / (2 if causal else 1)

        # float32 reference on batch element 0
        f32 = lambda x: x[:1].astype(jnp.float32)
        seg1 = None if seg is None else seg[:1]
        try:
            ref_out, ref_vjp = jax.vjp(
                lambda q, k, v: reference.attention(q, k, v, segment_ids=seg1, causal=causal), f32(q), f32(k), f32(v))
            ref_grads = ref_vjp(f32(do))
        except Exception as e:  # noqa: BLE001
            print(f"# {name}: float32 reference failed: {type(e).__name__}: {str(e)[:200]}")
            ref_out = ref_grads = None

        # Compile and warm every implementation, then time them round-robin (``rounds`` x ``iters`` calls each) so
        # that clock drift over the run hits all of them alike; report the median of all timed calls.
        cases = []
        for impl in _impls():
            row = dict(kernel="attention", shape=name, impl=impl, B=b, S=s, H=h, KV=kvh, D=d, causal=causal,
                       docs=docs, device=device)
            attn = _attention_fn(impl)
            fwd = jax.jit(lambda q, k, v, seg, attn=attn: attn(q, k, v, segment_ids=seg, causal=causal))

            fwd_bwd = jitted_fwd_bwd(attn, causal)
            fns = {}
            for key, fn, fargs in (("fwd", fwd, (q, k, v, seg)), ("fwdbwd", fwd_bwd, (q, k, v, seg, do))):
                try:
                    _time(fn, fargs, 1, warmup=2)
                    fns[key] = (fn, fargs)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{key} {type(e).__name__}: {str(e)[:160]}"
                    break
            cases.append((row, fns, fwd_bwd))
        times = {(id(row), key, timing): [] for row, fns, _ in cases for key in fns for timing in ("", "_stream")}
        for _ in range(rounds):
            for row, fns, _ in cases:
                for key, (fn, fargs) in fns.items():
                    for _ in range(iters):
                        times[(id(row), key, "")].append(_time(fn, fargs, 1, warmup=0))
                    times[(id(row), key, "_stream")].append(stream_ms(fn, *fargs, calls=iters, warmup=0) / 1e3)
        for row, fns, fwd_bwd in cases:
            for timing in ("", "_stream"):
                for key, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
                    if key in fns:
                        t = statistics.median(times[(id(row), key, timing)])
                        row[f"{key}{timing}_ms"] = round(t * 1e3, 3)
                        row[f"{key}{timing}_tflops"] = round(mult * fwd_flops / t / 1e12, 1)
            if ref_out is not None and "fwdbwd" in fns:
                try:
                    out, grads = fwd_bwd(q[:1], k[:1], v[:1], seg1, do[:1])
                    row["err_out"] = f"{_rel(out, ref_out):.1e}"
                    for n, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
                        row[f"err_{n}"] = f"{_rel(g, rg):.1e}"
                except Exception as e:  # noqa: BLE001
                    row["err_out"] = f"failed: {type(e).__name__}"
            rows.append(row)
            print("  ".join(f"{k_}={v_}" for k_, v_ in row.items()), flush=True)
        del cases
        del ref_out, ref_grads
    return rows


def tune(shape_name="llama-8b-s4k", iters=10):
    """Time the Pallas kernel over a few configs (forward and forward+backward) for one shape."""
    import dataclasses

    from pallas_kernels.attention import mosaic_gpu

    name, b, s, h, kvh, d, causal, docs = next(x for x in SHAPES if x[0] == shape_name)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.bfloat16)
    fwd_flops = 4 * b * s * s * h * d / (2 if causal else 1)
    base = mosaic_gpu.default_config(d, s)
    variants = [
        {},
        dict(block_kv=64),
        dict(max_concurrent_steps=3),
        dict(block_kv_dq=128),
        dict(bwd_steps=3),
        dict(block_q_dkv=128),
        dict(block_kv_dq=128, bwd_steps=3),
    ]
    for var in variants:
        cfg = dataclasses.replace(base, **var)
        try:
            fwd = jax.jit(lambda q, k, v: mosaic_gpu.attention(q, k, v, causal=causal, config=cfg))
            fb = jax.jit(lambda q, k, v, do: jax.vjp(
                lambda q, k, v: mosaic_gpu.attention(q, k, v, causal=causal, config=cfg), q, k, v)[1](do))
            t_f = _time(fwd, (q, k, v), iters)
            t_fb = _time(fb, (q, k, v, do), iters)
            print(f"tune {shape_name} {var}: fwd {fwd_flops / t_f / 1e12:.1f} TFLOP/s, "
                  f"fwd+bwd {3.5 * fwd_flops / t_fb / 1e12:.1f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"tune {shape_name} {var}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    import sys

    names = [x[0] for x in SHAPES]
    unknown = [shape for shape in sys.argv[1:] if shape not in names]
    if unknown:
        print(f"error: unknown shape {', '.join(map(repr, unknown))}; choose from {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    for shape in sys.argv[1:] or ["llama-8b-s4k"]:
        tune(shape)
