"""The `data:` section of a run config: which text to read, how to tokenize it, how to feed it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from litespark_jax.errors import ConfigError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus" / "pycorpus"
"""The bundled real-text corpus (SlimPajama layout), so a run works with no downloads."""

DEFAULT_TRAIN_FILES = str(CORPUS_DIR / "train" / "chunk*" / "*.jsonl.zst")
DEFAULT_VALIDATION_FILES = str(CORPUS_DIR / "validation" / "chunk*" / "*.jsonl.zst")

FORMATS = ("auto", "jsonl", "prepared")
BAD_RECORD_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it becomes batches (YAML section `data:`)."""

    train_files: str = DEFAULT_TRAIN_FILES
    """Glob of training shards (`*.jsonl` / `*.jsonl.zst`; comma-separate several globs), or the directory written by
    `python -m litespark_jax.prepare`. Relative paths resolve against the current working directory. Default: the
    bundled pycorpus train split."""

    validation_files: str = DEFAULT_VALIDATION_FILES
    """Glob (or prepared directory) of the holdout split used by the eval iterator and `unigram_entropy`."""

    tokenizer: str = "byte"
    """"byte" (UTF-8 bytes + BOS/EOS/PAD, no files needed), a Hugging Face `tokenizer.json`, a SentencePiece `.model`,
    or a directory holding one of them (as written by `Tokenizer.save`)."""

    format: str = "auto"
    """"jsonl" (tokenize on the fly), "prepared" (token shards from `prepare`), or "auto" (prepared when the path is a
    directory holding `metadata.json`)."""

    mixture: dict[str, float] | None = None
    """Optional sampling weights per `meta.redpajama_set_name`, e.g. {"RedPajamaC4": 0.7, "RedPajamaGithub": 0.3}.
    Weights are per document draw and are normalised; sets not named are not read. null: every document once per
    epoch."""

    on_bad_record: str = "error"
    """"error": stop at the first bad record with file and line; "skip": drop it and log a counted warning."""

    shuffle: bool = True
    """Shuffle documents with a fresh full permutation per epoch (seeded by the run seed). No shuffle buffer is needed:
    the permutation is global."""

    num_workers: int = 0
    """Grain worker processes that build batches (0 = build in a background thread of the training process)."""

    prefetch: int = 4
    """Batches built ahead of the training step."""

    token_cache_docs: int = 4096
    """Tokenized documents kept in memory per process when tokenizing on the fly (lengths are always kept)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key as `data.<field>`."""
        for name in ("train_files", "validation_files", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"data.{name}: expected a non-empty string, got {value!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ConfigError(
                f"data.on_bad_record: expected one of {', '.join(BAD_RECORD_POLICIES)}, got {self.on_bad_record!r}"
            )
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"data.shuffle: expected true or false, got {self.shuffle!r}")
        for name, minimum in (("num_workers", 0), ("prefetch", 0), ("token_cache_docs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"data.{name}: expected an integer >= {minimum}, got {value!r}")
        if self.mixture is not None:
            if not isinstance(self.mixture, dict) or not self.mixture:
                raise ConfigError(f"data.mixture: expected a non-empty mapping of set name to weight, got {self.mixture!r}")
            for key, weight in self.mixture.items():
                if not isinstance(key, str):
                    raise ConfigError(f"data.mixture: set names must be strings, got {key!r}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
                    raise ConfigError(f"data.mixture.{key}: expected a finite weight >= 0, got {weight!r}")
            if sum(self.mixture.values()) <= 0:
                raise ConfigError("data.mixture: weights sum to 0; give at least one set a positive weight")
