"""LiteSpark-JAX data pipeline: SlimPajama-style shards -> packed, deterministic, resumable, multi-host batches.

See docs/DATA.md for the design and the guarantees.
"""

from litespark_jax.data.config import DataConfig
from litespark_jax.data.pipeline import (
    BatchIterator,
    check_validation_split,
    make_eval_iterator,
    make_train_iterator,
    unigram_entropy,
)
from litespark_jax.data.tokenizers import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "DataConfig",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "check_validation_split",
    "load_tokenizer",
    "make_eval_iterator",
    "make_train_iterator",
    "unigram_entropy",
]
