"""Batches are a pure function of (seed, step): resume == uninterrupted, bitwise, across process counts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from litespark_jax.data import make_train_iterator
from litespark_jax.errors import DataError

SEQ_LEN = 16
GLOBAL_BATCH = 4


def train_iter(cfg, tok, process_index=0, process_count=1, seed=11):
    return make_train_iterator(cfg, tok, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=seed,
                               process_index=process_index, process_count=process_count)


def global_batches(cfg, tok, steps, process_count, state=None, seed=11):
    """Run `process_count` simulated processes in lockstep and concatenate their rows into global batches."""
    iterators = [train_iter(cfg, tok, p, process_count, seed) for p in range(process_count)]
    if state is not None:
        for it in iterators:
            it.set_state(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        parts = [next(it) for it in iterators]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out, iterators[0].get_state()


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            assert a[key].dtype == b[key].dtype


def test_one_process_and_two_processes_see_the_same_global_batches(corpus, byte_tokenizer):
    one, _ = global_batches(corpus["cfg"], byte_tokenizer, 25, process_count=1)
    two, _ = global_batches(corpus["cfg"], byte_tokenizer, 25, process_count=2)
    four, _ = global_batches(corpus["cfg"], byte_tokenizer, 25, process_count=4)
    assert_same(one, two)
    assert_same(one, four)


@pytest.mark.parametrize("before,after", [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_resume_after_n_steps_equals_uninterrupted(corpus, byte_tokenizer, before, after):
    uninterrupted, _ = global_batches(corpus["cfg"], byte_tokenizer, 30, process_count=1)
    _, state = global_batches(corpus["cfg"], byte_tokenizer, 13, process_count=before)
    assert state["step"] == 13 and len(json.dumps(state)) < 300
    resumed, _ = global_batches(corpus["cfg"], byte_tokenizer, 17, process_count=after, state=state)
    assert_same(uninterrupted[13:], resumed)


def test_state_is_restored_on_the_same_iterator_backwards_and_forwards(corpus, byte_tokenizer):
    it = train_iter(corpus["cfg"], byte_tokenizer)
    batches = [next(it) for _ in range(20)]
    it.set_state({"step": 5})
    assert_same(batches[5:9], [next(it) for _ in range(4)])
    it.set_state({"step": 18})
    assert_same(batches[18:20], [next(it) for _ in range(2)])


def test_seed_changes_the_order_and_shuffle_false_is_file_order(corpus, byte_tokenizer):
    a, _ = global_batches(corpus["cfg"], byte_tokenizer, 3, 1, seed=1)
    b, _ = global_batches(corpus["cfg"], byte_tokenizer, 3, 1, seed=2)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])
    cfg = dataclasses.replace(corpus["cfg"], shuffle=False)
    it = make_train_iterator(cfg, byte_tokenizer, seq_len=8, global_batch_size=1, seed=0, process_index=0,
                             process_count=1)
    first = corpus["train"][0].encode()
    assert next(it)["inputs"][0].tolist() == ([byte_tokenizer.bos_id] + list(first))[:8]


def test_state_from_a_different_configuration_is_refused(corpus, byte_tokenizer):
    it = train_iter(corpus["cfg"], byte_tokenizer, seed=1)
    state = it.get_state()
    other = train_iter(corpus["cfg"], byte_tokenizer, seed=2)
    with pytest.raises(DataError, match="seed"):
        other.set_state(state)


@pytest.mark.parametrize("change, named", [
    ("shuffle", r"data\.shuffle = True but this run has False"),
    ("other documents", r"the documents of data\.train_files \(their sizes\) = '[0-9a-f]{16}' but this run has"),
])
def test_state_from_other_data_or_order_is_refused_naming_the_setting(corpus, byte_tokenizer, change, named):
    state = train_iter(corpus["cfg"], byte_tokenizer).get_state()
    cfg = corpus["cfg"]
    if change == "shuffle":
        cfg = dataclasses.replace(cfg, shuffle=False)
    else:  # the same number of documents, one of them edited
        shard = corpus["root"] / "train" / "chunk1" / "example_train_0.jsonl"
        lines = shard.read_text().splitlines()
        lines[0] = json.dumps({"text": json.loads(lines[0])["text"] + " and a few more words"})
        shard.write_text("\n".join(lines) + "\n")
    other = train_iter(cfg, byte_tokenizer)
    with pytest.raises(DataError, match=named + r".*train\.resume_data=false"):
        other.set_state(json.loads(json.dumps(state)))
    other.set_state({"step": 3})  # a state without the new identity fields (an older checkpoint) is accepted


def test_grain_worker_processes_give_the_same_batches(corpus, byte_tokenizer):
    reference, _ = global_batches(corpus["cfg"], byte_tokenizer, 6, 1)
    cfg = dataclasses.replace(corpus["cfg"], num_workers=2)
    it = train_iter(cfg, byte_tokenizer)
    assert_same(reference, [next(it) for _ in range(6)])
    state = it.get_state()
    resumed = train_iter(cfg, byte_tokenizer)
    resumed.set_state(state)
    more, _ = global_batches(corpus["cfg"], byte_tokenizer, 8, 1)
    assert_same(more[6:], [next(resumed) for _ in range(2)])


def test_grain_checkpoint_handler_round_trip(corpus, byte_tokenizer, tmp_path):
    import grain
    from etils import epath

    it = train_iter(corpus["cfg"], byte_tokenizer)
    reference = [next(it) for _ in range(6)]
    it.set_state({"step": 3})
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    restored = handler.restore(epath.Path(tmp_path), item=train_iter(corpus["cfg"], byte_tokenizer))
    assert_same(reference[3:6], [next(restored) for _ in range(3)])
    states = {json.dumps(train_iter(corpus["cfg"], byte_tokenizer, p, 2).get_state()) for p in range(2)}
    assert len(states) == 1, "every process holds the same state: save it once"
