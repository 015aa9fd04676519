"""LiteSpark-JAX data pipeline: SlimPajama-style shards -> packed, deterministic, resumable, multi-host batches.

See docs/DATA.md for the design and the guarantees.
"""

import importlib

# Each public name and the module that defines it, imported on first use: ``litespark_jax.config`` reads
# ``data.config`` alone, so a command given a bad flag or config fails before grain and jax are imported (~2 s).
_EXPORTS = {
    "DataConfig": "config",
    "BatchIterator": "pipeline",
    "check_validation_split": "pipeline",
    "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline",
    "unigram_entropy": "pipeline",
    "ByteTokenizer": "tokenizers",
    "HuggingFaceTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers",
    "Tokenizer": "tokenizers",
    "build_tokenizer": "tokenizers",
    "load_tokenizer": "tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
