"""Fit a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a corpus, for users who cannot download one."""

from __future__ import annotations

import os

from litespark_jax.data.sources import read_jsonl_shard, resolve_files
from litespark_jax.errors import ConfigError

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def iter_texts(files: str, on_bad_record: str = "error", max_docs: int | None = None):
    count = 0
    for path in resolve_files(files, "--files"):
        for text in read_jsonl_shard(path, on_bad_record).texts:
            if max_docs is not None and count >= max_docs:
                return
            count += 1
            yield text


def train_bpe(files: str, out_dir: str, *, vocab_size: int = 32000, min_frequency: int = 2,
              on_bad_record: str = "error", max_docs: int | None = None, progress: bool = True) -> str:
    """Train on every document matched by `files`; writes `out_dir/tokenizer.json` and returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
    resolve_files(files, "--files")  # a glob that matches nothing fails here, before the trainer's progress output
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tokenizer.train_from_iterator(iter_texts(files, on_bad_record, max_docs), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tokenizer.save(path)
    return path
