"""`python -m litespark_jax.tokenizer train`: fit a byte-level BPE tokenizer on a corpus (no downloads needed).

    python -m litespark_jax.tokenizer train --files 'data/train/**/*.jsonl.zst' --vocab-size 32000 --out tok/

Use the result with `data.tokenizer: tok/tokenizer.json` (or `tok/`).
"""

from __future__ import annotations

import sys

from litespark_jax.cli import ArgumentParser
from litespark_jax.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE tokenizer.json")
    train.add_argument("--files", default=None, help="glob(s) of *.jsonl / *.jsonl.zst (default: bundled corpus)")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    train.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    train.add_argument("--out", required=True, help="output directory for tokenizer.json")
    train.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.min_frequency < 0:
        train.error(f"--min-frequency {args.min_frequency}: must not be negative")
    from litespark_jax.cli import require_at_least, require_output_dir

    require_at_least(train, args, max_docs=1)
    require_output_dir(train, "--out", args.out)
    from litespark_jax.data.bpe_train import train_bpe
    from litespark_jax.data.config import DEFAULT_TRAIN_FILES

    try:
        path = train_bpe(args.files or DEFAULT_TRAIN_FILES, args.out, vocab_size=args.vocab_size,
                         min_frequency=args.min_frequency, on_bad_record=args.on_bad_record, max_docs=args.max_docs,
                         progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
