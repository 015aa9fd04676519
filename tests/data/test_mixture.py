"""Mixture weights by redpajama_set_name: measured document proportions match the weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from litespark_jax.data import make_train_iterator
from litespark_jax.errors import DataError


def document_sets(cfg, tok, steps):
    """Set letter of every document start (BOS) seen in `steps` batches, read from the tokens themselves."""
    it = make_train_iterator(cfg, tok, seq_len=64, global_batch_size=4, seed=5, process_index=0, process_count=1)
    letters = []
    for _ in range(steps):
        batch = next(it)
        inputs, targets = batch["inputs"], batch["targets"]
        rows, cols = np.nonzero(inputs == tok.bos_id)
        letters.extend(chr(targets[r, c]) for r, c in zip(rows, cols))
    return np.array(letters)


@pytest.mark.parametrize("weights", [{"SetA": 0.8, "SetB": 0.2}, {"SetA": 1, "SetB": 3}])
def test_mixture_proportions_within_tolerance(mixed_corpus, byte_tokenizer, weights):
    cfg = dataclasses.replace(mixed_corpus, mixture=weights)
    letters = document_sets(cfg, byte_tokenizer, 400)
    assert len(letters) > 2000
    share_a = float(np.mean(letters == "A"))
    expected = weights["SetA"] / sum(weights.values())
    assert abs(share_a - expected) < 0.03, (share_a, expected)


def test_without_mixture_every_document_once_per_epoch(mixed_corpus, byte_tokenizer):
    letters = document_sets(mixed_corpus, byte_tokenizer, 400)
    assert abs(float(np.mean(letters == "A")) - 0.5) < 0.03


def test_zero_weight_set_is_never_read(mixed_corpus, byte_tokenizer):
    cfg = dataclasses.replace(mixed_corpus, mixture={"SetA": 1.0, "SetB": 0.0})
    assert set(document_sets(cfg, byte_tokenizer, 50)) == {"A"}


def test_unknown_set_name_is_an_error(mixed_corpus, byte_tokenizer):
    cfg = dataclasses.replace(mixed_corpus, mixture={"SetA": 1.0, "RedPajamaArXiv": 1.0})
    with pytest.raises(DataError, match="RedPajamaArXiv.*the data has: SetA, SetB"):
        make_train_iterator(cfg, byte_tokenizer, seq_len=8, global_batch_size=1, seed=0, process_index=0,
                            process_count=1)


def test_mixture_is_process_count_independent(mixed_corpus, byte_tokenizer):
    cfg = dataclasses.replace(mixed_corpus, mixture={"SetA": 0.3, "SetB": 0.7})
    one = make_train_iterator(cfg, byte_tokenizer, seq_len=16, global_batch_size=4, seed=2, process_index=0,
                              process_count=1)
    halves = [make_train_iterator(cfg, byte_tokenizer, seq_len=16, global_batch_size=4, seed=2, process_index=p,
                                  process_count=2) for p in range(2)]
    for _ in range(20):
        full = next(one)
        parts = [next(h) for h in halves]
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts]))
