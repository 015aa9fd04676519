"""Packing: unpacking gives the documents back; segment ids, positions and loss mask right at every boundary."""

from __future__ import annotations

import numpy as np
import pytest

from litespark_jax.data import make_train_iterator
from litespark_jax.data.packing import pack_window, stream_of_row, unpack_documents

SEQ_LEN = 32
BATCH = 3


def reference_row(inputs, targets, bos, eos, pad):
    """Segment ids, positions and loss mask derived from token values alone (independent of the packer)."""
    window = list(inputs) + [targets[-1]]
    seg, pos, mask = [], [], []
    segment = position = 0
    for t in range(len(inputs)):
        token = window[t]
        if token == pad:
            seg.append(0), pos.append(0), mask.append(0.0)
            continue
        if t == 0 or token == bos or window[t - 1] == eos:
            segment, position = segment + 1, 0
        seg.append(segment), pos.append(position)
        position += 1
        mask.append(0.0 if token == eos or window[t + 1] == pad else 1.0)
    return np.array(seg), np.array(pos), np.array(mask, dtype=np.float32)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_round_trip_every_document_comes_back_once_per_epoch(corpus, byte_tokenizer):
    tok = byte_tokenizer
    total_bytes = sum(len(t.encode()) + 2 for t in corpus["train"])
    steps = 2 * total_bytes // SEQ_LEN + 5  # enough for two epochs even if one row got all long documents
    it = make_train_iterator(corpus["cfg"], tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=7,
                             process_index=0, process_count=1)
    batches = take(it, steps)
    rows = [[tok.decode(d) for d in unpack_documents(stream_of_row(batches, r), tok.bos_id, tok.eos_id)]
            for r in range(BATCH)]
    n = len(corpus["train"])
    # Global slot s lives in row s % B, as that row's (s // B)-th document.
    first_epoch = [rows[s % BATCH][s // BATCH] for s in range(n)]
    assert sorted(first_epoch) == sorted(corpus["train"])
    second_epoch = [rows[s % BATCH][s // BATCH] for s in range(n, 2 * n)]
    assert sorted(second_epoch) == sorted(corpus["train"])
    assert first_epoch != second_epoch, "each epoch must be reshuffled"
    assert max(len(t.encode()) for t in corpus["train"]) > 3 * SEQ_LEN  # long documents were split, not dropped


def test_segment_ids_positions_and_loss_mask_at_every_boundary(corpus, byte_tokenizer):
    tok = byte_tokenizer
    it = make_train_iterator(corpus["cfg"], tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=3,
                             process_index=0, process_count=1)
    boundaries = 0
    for batch in take(it, 60):
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
        for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                           ("positions", np.int32), ("loss_mask", np.float32)]:
            assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        for r in range(BATCH):
            seg, pos, mask = reference_row(batch["inputs"][r], batch["targets"][r], tok.bos_id, tok.eos_id, tok.pad_id)
            np.testing.assert_array_equal(batch["segment_ids"][r], seg)
            np.testing.assert_array_equal(batch["positions"][r], pos)
            np.testing.assert_array_equal(batch["loss_mask"][r], mask)
            boundaries += int((batch["inputs"][r] == tok.eos_id).sum())
    assert boundaries > 20


def test_pack_window_handles_padding_and_tiny_pieces():
    row = pack_window([np.array([9, 1, 2]), np.array([8]), np.array([9, 3])], seq_len=8, pad_id=0)
    np.testing.assert_array_equal(row["inputs"], [9, 1, 2, 8, 9, 3, 0, 0])
    np.testing.assert_array_equal(row["targets"], [1, 2, 8, 9, 3, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 3, 3, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 0, 1, 0, 0, 0])


@pytest.mark.parametrize("seq_len", [1, 5, 64])
def test_document_longer_than_window_is_split_across_windows(tmp_path, byte_tokenizer, seq_len):
    from litespark_jax.data import DataConfig
    from tests.data.conftest import records, write_jsonl

    text = "x" * 37 + "é" * 20
    write_jsonl(tmp_path / "one.jsonl", records([text]))
    cfg = DataConfig(train_files=str(tmp_path / "one.jsonl"), prefetch=0)
    it = make_train_iterator(cfg, byte_tokenizer, seq_len=seq_len, global_batch_size=1, seed=0,
                             process_index=0, process_count=1)
    n_windows = (len(text.encode()) + 2) * 2 // seq_len + 2
    stream = stream_of_row(take(it, n_windows), 0)
    docs = unpack_documents(stream, byte_tokenizer.bos_id, byte_tokenizer.eos_id)
    assert byte_tokenizer.decode(docs[0]) == text and byte_tokenizer.decode(docs[1]) == text
