"""Eval iterator: finite, repeatable, covers the holdout split in order; unigram entropy; global arrays."""

from __future__ import annotations

import collections
import math

import jax
import numpy as np

from litespark_jax.data import make_eval_iterator, unigram_entropy
from litespark_jax.data.global_batch import to_global_arrays
from litespark_jax.data.packing import stream_of_row


def eval_batches(cfg, tok, process_count=1, max_batches=None, batch=3, seq_len=20):
    iterators = [make_eval_iterator(cfg, tok, seq_len=seq_len, global_batch_size=batch, process_index=p,
                                    process_count=process_count, max_batches=max_batches)
                 for p in range(process_count)]
    return [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]} for parts in zip(*iterators)]


def test_eval_covers_the_holdout_split_once_in_order(corpus, byte_tokenizer):
    tok = byte_tokenizer
    batches = eval_batches(corpus["cfg"], tok)
    windows = [{k: b[k][r:r + 1] for k in b} for b in batches for r in range(b["inputs"].shape[0])]
    stream = stream_of_row(windows, 0)
    expected = np.concatenate([[tok.bos_id, *t.encode(), tok.eos_id] for t in corpus["validation"]])
    np.testing.assert_array_equal(stream[:len(expected)], expected)
    assert (stream[len(expected):] == tok.pad_id).all()
    real = sum(len(t.encode()) + 1 for t in corpus["validation"])  # every token and EOS is a target once
    assert sum(float(b["loss_mask"].sum()) for b in batches) == real
    last = batches[-1]
    assert (last["segment_ids"][last["inputs"] == tok.pad_id] == 0).all()


def test_eval_is_repeatable_finite_and_process_count_independent(corpus, byte_tokenizer):
    a = eval_batches(corpus["cfg"], byte_tokenizer)
    b = eval_batches(corpus["cfg"], byte_tokenizer)
    c = eval_batches(corpus["cfg"], byte_tokenizer, process_count=3)
    assert len(a) == len(b) == len(c) > 1
    for x, y, z in zip(a, b, c):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
            np.testing.assert_array_equal(x[key], z[key])
    limited = eval_batches(corpus["cfg"], byte_tokenizer, max_batches=2)
    assert len(limited) == 2
    for x, y in zip(limited, a[:2]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_unigram_entropy_matches_direct_count(corpus, byte_tokenizer):
    counts = collections.Counter()
    for text in corpus["validation"]:
        counts.update(text.encode())
        counts["eos"] += 1
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert math.isclose(unigram_entropy(corpus["cfg"], byte_tokenizer), expected, rel_tol=1e-9)


def test_bundled_corpus_eval_and_entropy(byte_tokenizer):
    from litespark_jax.data import DataConfig

    cfg = DataConfig()
    batches = eval_batches(cfg, byte_tokenizer, batch=4, seq_len=256, max_batches=3)
    assert len(batches) == 3 and batches[0]["inputs"].shape == (4, 256)
    assert 2.0 < unigram_entropy(cfg, byte_tokenizer) < 5.5


def test_to_global_arrays_single_process():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    local = {"inputs": np.arange(12, dtype=np.int32).reshape(2, 6), "loss_mask": np.ones((2, 6), np.float32)}
    out = to_global_arrays(local, sharding, 2)
    assert out["inputs"].shape == (2, 6) and out["inputs"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["inputs"]), local["inputs"])


def test_each_process_builds_the_rows_its_devices_hold():
    """The block of rows a process builds comes from the batch sharding, not from its process index: a process whose
    devices hold every row (tensor parallelism across processes) builds them all; reading them back from its own
    shards gives them."""
    from litespark_jax.data.global_batch import process_local_rows, process_row_shard

    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "tensor"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert process_row_shard(sharding, 8) == (0, 1)
    local = {"inputs": np.arange(16, dtype=np.int32).reshape(8, 2)}
    out = to_global_arrays(local, sharding, 8)
    np.testing.assert_array_equal(process_local_rows(out["inputs"], 2, 6), local["inputs"][2:6])


def test_eval_batches_are_the_same_when_rows_are_tokenized_by_a_slow_tokenizer(tmp_path):
    """A real tokenizer builds rows on a thread pool; the eval rows all read one document stream, whose window
    bookkeeping is not thread-safe (the batches came out different on every run). A byte tokenizer under another
    name takes the threaded path and must give the byte tokenizer's batches."""
    import json

    from litespark_jax.data import ByteTokenizer, DataConfig

    class SlowNamedByteTokenizer(ByteTokenizer):
        name = "byte-under-another-name"

    path = tmp_path / "holdout.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " + "x" * (i % 13)}) + "\n" for i in range(3000)))
    cfg = DataConfig(validation_files=str(path))
    reference = eval_batches(cfg, ByteTokenizer(), batch=128, seq_len=8)
    threaded = eval_batches(cfg, SlowNamedByteTokenizer(), batch=128, seq_len=8)
    assert len(threaded) == len(reference)
    for got, want in zip(threaded, reference):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
