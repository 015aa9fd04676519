"""Data-pipeline throughput on this host: tokens/s delivered to the training loop, per path.

    python -m litespark_jax.data.benchmark [--seq-len 2048] [--batch 8] [--tokens 20000000] [--workdir /tmp/lsbench]

Measures (on the bundled corpus): time to the first batch of the default run; the prepared path (byte and BPE token
shards); on-the-fly tokenization (byte, and BPE with a tokenizer trained here). "Delivered" means batches pulled
from the iterator as the trainer would, after one warm-up batch, tokens = batch * seq_len.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time

from litespark_jax.cli import ArgumentParser

H100_3B_CONSUMPTION = 28_000  # tok/s the 3B model eats on one H100 at our MFU goal


def _rate(cfg, tokenizer, *, seq_len, batch, tokens, repeat=1) -> dict:
    """Median and best of `repeat` cold measurements (this host is shared: single runs swing with its load)."""
    runs = [_rate_once(cfg, tokenizer, seq_len=seq_len, batch=batch, tokens=tokens, seed=i) for i in range(repeat)]
    rates = sorted(r["tok_per_s"] for r in runs)
    return {"tok_per_s_median": rates[len(rates) // 2], "tok_per_s_best": rates[-1],
            "first_batch_s_median": sorted(r["first_batch_s"] for r in runs)[len(runs) // 2],
            # Load-independent view: tokens per second of CPU this process got (all its threads together), and how
            # many cores it managed to use. On a loaded host tok/s ~= tok_per_cpu_s * cores actually granted.
            "tok_per_cpu_s_median": sorted(r["tok_per_cpu_s"] for r in runs)[len(runs) // 2],
            "cpu_utilisation_median": sorted(r["cpu_utilisation"] for r in runs)[len(runs) // 2],
            "steps": runs[0]["steps"], "repeats": repeat, "load_avg_1min": os.getloadavg()[0]}


def _rate_once(cfg, tokenizer, *, seq_len, batch, tokens, seed=0) -> dict:
    from litespark_jax.data import make_train_iterator
    from litespark_jax.data import pipeline

    pipeline._STORE_CACHE.clear()  # measure cold: no documents tokenized yet
    start = time.perf_counter()
    it = make_train_iterator(cfg, tokenizer, seq_len=seq_len, global_batch_size=batch, seed=seed,
                             process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - start
    steps = max(1, tokens // (seq_len * batch))
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tok_per_s": steps * seq_len * batch / elapsed, "first_batch_s": first, "steps": steps,
            "tok_per_cpu_s": steps * seq_len * batch / cpu, "cpu_utilisation": cpu / elapsed}


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m litespark_jax.data.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="global batch (one process)")
    parser.add_argument("--tokens", type=int, default=20_000_000, help="tokens per measurement (prepared path)")
    parser.add_argument("--otf-tokens", type=int, default=2_000_000, help="tokens per on-the-fly BPE measurement")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--workdir", default="/tmp/litespark-data-bench")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per path (median and best reported)")
    parser.add_argument("--reuse", action="store_true", help="keep prepared corpora already in --workdir")
    args = parser.parse_args(argv)
    from litespark_jax.cli import require_at_least

    require_at_least(parser, args, seq_len=1, batch=1, tokens=1, otf_tokens=1, vocab_size=1, repeat=1)

    from litespark_jax.data import DataConfig, build_tokenizer
    from litespark_jax.data.bpe_train import train_bpe
    from litespark_jax.data.prepared import is_prepared, prepare_corpus

    os.makedirs(args.workdir, exist_ok=True)
    base = DataConfig()
    results = {}
    kw = dict(seq_len=args.seq_len, batch=args.batch, repeat=args.repeat)

    t = time.perf_counter()
    bpe_path = os.path.join(args.workdir, "bpe", "tokenizer.json")
    if not os.path.exists(bpe_path):
        train_bpe(base.train_files, os.path.dirname(bpe_path), vocab_size=args.vocab_size, progress=False)
    results["bpe_train_s"] = time.perf_counter() - t
    byte, bpe = build_tokenizer("byte"), build_tokenizer(bpe_path)

    for name, spec in (("byte", "byte"), ("bpe", bpe_path)):
        out = os.path.join(args.workdir, f"prepared-{name}")
        if args.reuse and is_prepared(out):
            continue
        t = time.perf_counter()
        meta = prepare_corpus(base.train_files, spec, out, workers=os.cpu_count() or 1, overwrite=True, progress=False)
        seconds = time.perf_counter() - t
        results[f"prepare_{name}"] = {"seconds": seconds, "tokens": meta["num_tokens"],
                                      "tok_per_s": meta["num_tokens"] / seconds}

    results["jsonl_byte"] = _rate(base, byte, tokens=args.tokens, **kw)
    results["jsonl_bpe"] = _rate(dataclasses.replace(base, tokenizer=bpe_path), bpe, tokens=args.otf_tokens, **kw)
    results["prepared_byte"] = _rate(dataclasses.replace(base, train_files=os.path.join(args.workdir, "prepared-byte")),
                                     byte, tokens=args.tokens, **kw)
    results["prepared_bpe"] = _rate(dataclasses.replace(base, train_files=os.path.join(args.workdir, "prepared-bpe"),
                                                        tokenizer=bpe_path), bpe, tokens=args.tokens, **kw)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    results["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                       "cpus": os.cpu_count(), "machine": platform.platform(), "processor": platform.processor(),
                       "seq_len": args.seq_len, "batch": args.batch, "vocab_size": bpe.vocab_size,
                       "h100_3b_consumption_tok_per_s": H100_3B_CONSUMPTION}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
