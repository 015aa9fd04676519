"""`python -m litespark_jax.prepare`: tokenize a jsonl(.zst) corpus offline into token shards for large runs.

    python -m litespark_jax.prepare --files 'SlimPajama-627B/train/chunk*/*.jsonl.zst' \
        --tokenizer tokenizer.json --out prepared/train --workers 16

Then point `data.train_files` at the output directory (format "auto" detects it).
"""

from __future__ import annotations

import sys

from litespark_jax.cli import ArgumentParser
from litespark_jax.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, help="glob(s) of *.jsonl / *.jsonl.zst shards (comma-separated)")
    parser.add_argument("--tokenizer", default="byte", help='"byte", a tokenizer.json, a .model, or a directory')
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (one shard each)")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from litespark_jax.cli import require_output_dir
    from litespark_jax.data.prepared import prepare_corpus

    require_output_dir(parser, "--out", args.out)

    try:
        meta = prepare_corpus(args.files, args.tokenizer, args.out, workers=max(1, args.workers),
                              on_bad_record=args.on_bad_record, overwrite=args.overwrite, progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['num_docs']} documents, {meta['num_tokens']} tokens in {len(meta['shards'])} "
          f"shards ({meta['skipped_records']} bad records skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
