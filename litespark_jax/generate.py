"""``python -m litespark_jax.generate --checkpoint DIR --prompt "def main():" [options] [section.key=value ...]``

Loads the model and its config from a checkpoint directory (its newest good step, or one step directory ``DIR/<step>``)
or from a Hugging Face Llama directory (``--hf-dir``), encodes the prompt with the run's tokenizer
(``data.tokenizer``; a ``--hf-dir`` holding a tokenizer file uses that one; override it with ``data.tokenizer=...``)
and prints the continuation, decoded with the KV cache: greedy by default, sampled with ``--temperature`` and
optional ``--top-k`` / ``--top-p``. Generation stops at EOS or, for a run with a chat template (every checkpoint's
``posttrain.template``; with ``--hf-dir``, a ``posttrain.template=...`` override), at its end-of-turn token, which
is how an SFT/DPO model ends its answer. ``--chat`` sends the prompt as a user turn of that template.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from litespark_jax.cli import ArgumentParser, run_main
from litespark_jax.errors import ConfigError, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m litespark_jax.generate", description=__doc__.split("\n", 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (newest good step) or DIR/<step>")
    source.add_argument("--hf-dir", help="a Hugging Face Llama directory (config.json + safetensors; its tokenizer "
                                         "file, if any, unless data.tokenizer=... is given)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat for a batch of prompts")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user turn of the run's chat template (posttrain.template) "
                             "followed by the assistant header, as SFT/DPO trained on; prints the assistant's answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int,
                        help="sample among the k most likely tokens (default 0 = all; needs --temperature > 0)")
    parser.add_argument("--top-p", type=float,
                        help="nucleus sampling mass (default 1.0 = off; needs --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1,
                        help="continuations per prompt (> 1 needs --temperature > 0)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text or end-of-turn token")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override the loaded config (e.g. data.tokenizer=tok/)")
    return parser


def check_sampling_flags(parser: argparse.ArgumentParser, args) -> None:
    """Bad sampling flags are refused before the (possibly long) model load: out-of-range values, and flags greedy
    decoding would ignore (top-k / top-p other than their "off" values 0 / 1.0, and several identical samples)."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        parser.error(f"--top-k {args.top_k}: must be at least 0 (0 = all tokens)")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p {args.top_p}: must be in (0, 1] (1.0 = off)")
    if args.temperature == 0:
        given = [flag for flag, value, off in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0))
                 if value is not None and value != off]
        if args.num_samples > 1:
            given.append(f"--num-samples {args.num_samples}")
        if given:
            parser.error(f"{', '.join(given)}: only used when sampling; set --temperature > 0 (0 is greedy)")


def _hf_tokenizer_override(hf_dir: str, overrides: list[str]) -> list[str]:
    """``data.tokenizer=<hf_dir>`` when the directory holds a tokenizer file and no ``data.tokenizer`` is given."""
    from litespark_jax.data.tokenizers import BYTE_FILE, HF_FILE, SENTENCEPIECE_FILE

    if any(o.startswith("data.tokenizer=") for o in overrides):
        return []
    has_file = any(os.path.isfile(os.path.join(hf_dir, f)) for f in (HF_FILE, SENTENCEPIECE_FILE, BYTE_FILE))
    return [f"data.tokenizer={hf_dir}"] if has_file else []


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    check_sampling_flags(parser, args)
    from litespark_jax import api

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    # Every saved config carries posttrain.template; an HF directory has one only when it is given.
    has_template = bool(args.checkpoint) or any(o.startswith("posttrain.template=") for o in args.overrides)
    if args.chat and not has_template:
        raise ConfigError("--chat needs a chat template: an --hf-dir model has none; add posttrain.template=llama3 "
                          "(or chatml) if it was fine-tuned with one")
    if args.checkpoint:
        model, config = api.load_checkpoint(args.checkpoint, args.overrides)
    else:
        overrides = args.overrides + _hf_tokenizer_override(args.hf_dir, args.overrides)
        base = api.load_config(None, overrides) if overrides else None
        model, config = api.import_hf(args.hf_dir, base)
    tok = api.tokenizer(config)
    template = api.chat_template(config, tok) if has_template else None
    print(f"tokenizer: {tok.name}" + (f", chat template {config.posttrain.template}" if template else ""),
          file=sys.stderr)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    start = time.perf_counter()
    try:
        texts = api.generate_text(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k or 0,
                                  top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
                                  stop_at_eos=not args.no_stop, template=template, chat=args.chat)
    except ValueError as e:  # a request the model cannot serve (too long, bad sampling parameters)
        raise UserError(str(e)) from None
    elapsed = time.perf_counter() - start
    for prompt, text in zip(prompts, texts):
        print(text if args.chat else f"{prompt}{text}")
        if len(prompts) > 1:
            print("-" * 40)
    print(f"({len(prompts)} x {args.max_new_tokens} tokens max in {elapsed:.1f}s, including compilation)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
