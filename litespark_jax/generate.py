"""``python -m litespark_jax.generate --checkpoint DIR --prompt "def main():" [options] [section.key=value ...]``

Loads the model and its config from a checkpoint directory (its newest good step, or one step directory ``DIR/<step>``)
or from a Hugging Face Llama directory (``--hf-dir``), encodes the prompt with the run's tokenizer
(``data.tokenizer``; override it with ``data.tokenizer=...``) and prints the continuation, decoded with the KV
cache: greedy by default, sampled with ``--temperature`` and optional ``--top-k`` / ``--top-p``.
"""

from __future__ import annotations

import argparse
import sys
import time

from litespark_jax.cli import run_main
from litespark_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m litespark_jax.generate", description=__doc__.splitlines()[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (newest good step) or DIR/<step>")
    source.add_argument("--hf-dir", help="a Hugging Face Llama directory (config.json + safetensors)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (use with sampling)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override the loaded config (e.g. data.tokenizer=tok/)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from litespark_jax import api

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.checkpoint:
        model, config = api.load_checkpoint(args.checkpoint, args.overrides)
    else:
        base = api.load_config(None, args.overrides) if args.overrides else None
        model, config = api.import_hf(args.hf_dir, base)
    tok = api.tokenizer(config)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    start = time.perf_counter()
    try:
        texts = api.generate_text(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                  stop_at_eos=not args.no_stop)
    except ValueError as e:  # a request the model cannot serve (too long, bad sampling parameters)
        raise UserError(str(e)) from None
    elapsed = time.perf_counter() - start
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}")
        if len(prompts) > 1:
            print("-" * 40)
    print(f"({len(prompts)} x {args.max_new_tokens} tokens max in {elapsed:.1f}s, including compilation)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
