"""Shared fixtures: tiny SlimPajama-layout corpora written to tmp dirs, with known documents."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zstandard

from litespark_jax.data import ByteTokenizer, DataConfig

ALPHABET = list("abcdefghijklmnopqrstuvwxyz     .,\n") + ["é", "→", "λ"]


def write_jsonl(path, records, compress: bool | None = None) -> str:
    """Write dict records (or raw str lines) as jsonl, zstd-compressed when the name ends in .zst."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if compress if compress is not None else path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_docs(n: int, seed: int, prefix: str = "", max_len: int = 120, long_every: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(0, max_len))
        if long_every and i % long_every == 0:
            length = max_len * 6
        docs.append(prefix + "".join(rng.choice(ALPHABET, size=length)))
    return docs


def records(texts, set_name="RedPajamaC4"):
    return [{"text": t, "meta": {"redpajama_set_name": set_name}} for t in texts]


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def corpus(tmp_path):
    """Two train shards (one .jsonl, one .jsonl.zst; 60 docs, some longer than any test window) + a holdout shard."""
    train_a = make_docs(30, seed=1, long_every=7)
    train_b = make_docs(30, seed=2)
    valid = make_docs(12, seed=3)
    write_jsonl(tmp_path / "train" / "chunk1" / "example_train_0.jsonl", records(train_a))
    write_jsonl(tmp_path / "train" / "chunk1" / "example_train_1.jsonl.zst", records(train_b))
    write_jsonl(tmp_path / "validation" / "chunk1" / "example_holdout_0.jsonl.zst", records(valid))
    cfg = DataConfig(train_files=str(tmp_path / "train" / "chunk*" / "*.jsonl*"),
                     validation_files=str(tmp_path / "validation" / "*" / "*.zst"), prefetch=2)
    return {"cfg": cfg, "train": train_a + train_b, "validation": valid, "root": tmp_path}


@pytest.fixture
def mixed_corpus(tmp_path):
    """Set A (documents starting with 'A') and set B (starting with 'B'), 40 documents each, mixed in the shards."""
    recs = records(make_docs(40, seed=4, prefix="A", max_len=40), "SetA") + \
        records(make_docs(40, seed=5, prefix="B", max_len=40), "SetB")
    order = np.random.default_rng(0).permutation(len(recs))
    write_jsonl(tmp_path / "mix" / "part_0.jsonl", [recs[i] for i in order])
    return DataConfig(train_files=str(tmp_path / "mix" / "*.jsonl"), validation_files=str(tmp_path / "mix" / "*.jsonl"),
                      prefetch=0)
