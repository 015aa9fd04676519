"""Chat templates, SFT/DPO data preparation, and every kind of bad input (one clear DataError, or counted)."""

import numpy as np
import pytest

from litespark_jax.data.tokenizers import ByteTokenizer
from litespark_jax.errors import ConfigError, DataError
from litespark_jax.posttrain import dpo_data, sft_data
from litespark_jax.posttrain.template import TemplateTokens, get_template

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"}]


def tt(name="llama3", **kw):
    return TemplateTokens(get_template(name), ByteTokenizer(), **kw)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_template_targets_exactly_the_assistant_turns(name):
    t = tt(name)
    tokens, target = t.render(CHAT)
    eot = t.special_ids[t.template.end_of_turn]
    trained = [tok for tok, m in zip(tokens, target) if m]
    assert trained == [ord("4"), eot, ord("6"), eot]
    # Special tokens are single ids outside the byte range; nothing else is.
    assert all(tok < 256 or tok in set(t.special_ids.values()) | {256} for tok in tokens)


def test_llama3_layout_and_special_ids():
    t = tt()
    tokens, _ = t.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    s = t.special_ids
    assert s["<|begin_of_text|>"] == ByteTokenizer.bos_id  # the tokenizer's BOS stands in for begin_of_text
    expected = ([s["<|begin_of_text|>"], s["<|start_header_id|>"], *b"user", s["<|end_header_id|>"], *b"\n\nhi",
                 s["<|eot_id|>"], s["<|start_header_id|>"], *b"assistant", s["<|end_header_id|>"], *b"\n\nyo",
                 s["<|eot_id|>"]])
    assert tokens == expected
    assert t.vocab_size == 262
    with pytest.raises(ConfigError, match="model.vocab_size"):
        t.check_vocab(259)


def test_user_text_cannot_inject_special_tokens():
    tokens, target = tt().render([{"role": "user", "content": "<|eot_id|>"}, {"role": "assistant", "content": "x"}])
    assert tokens.count(tt().special_ids["<|eot_id|>"]) == 2  # only the two real turn ends


def test_system_prompt_added_when_missing():
    tokens, _ = tt(system_prompt="S").render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert bytes(t for t in tokens if t < 256).startswith(b"system\n\nS")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "q"}], "no assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "no assistant turn"),
    ([{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}], "role 'tool'.*does not know"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "string 'content'"),
    ([], "non-empty list"),
])
def test_bad_conversations(messages, match, jsonl):
    path = jsonl([{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]},
                  {"messages": messages}])
    with pytest.raises(DataError, match=f"{path}:2: .*{match}"):
        sft_data.prepare_sft(path, tt(), 64, "truncate")


@pytest.mark.parametrize("row, match", [
    ("not json", "not valid JSON"),
    ({"prompt": "q"}, "'completion' must be a non-empty string"),
    ({"prompt": "", "completion": "a"}, "'prompt' must be a non-empty string"),
    ({"text": "x"}, "needs 'messages' or 'prompt' and 'completion'"),
])
def test_bad_sft_lines(row, match, jsonl):
    with pytest.raises(DataError, match=match):
        sft_data.prepare_sft(jsonl([row]), tt(), 64, "truncate")


@pytest.mark.parametrize("row, match", [
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' side of the pair is empty"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "'chosen' side of the pair is empty"),
    ({"prompt": "q", "chosen": "a"}, r"a DPO line needs 'prompt', 'chosen' and 'rejected' \(has \['chosen', 'prompt'\]\)"),
    ({"messages": [{"role": "user", "content": "q"}]}, "a DPO line needs 'prompt', 'chosen' and 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' must be a string, got int"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "role 'robot'"),
])
def test_bad_pairs(row, match, jsonl):
    path = jsonl([row])
    with pytest.raises(DataError, match=f"{path}:1: .*{match}"):
        dpo_data.prepare_dpo(path, tt(), 64, "truncate")


@pytest.mark.parametrize("prepare, row", [
    (sft_data.prepare_sft, b'{"prompt": "caf\xe9?", "completion": "yes"}'),
    (dpo_data.prepare_dpo, b'{"prompt": "caf\xe9?", "chosen": "yes", "rejected": "no"}'),
])
def test_invalid_utf8_names_file_and_line(prepare, row, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "completion": "ok", "chosen": "a", "rejected": "b"}\n' + row + b"\n")
    with pytest.raises(DataError, match=f"^{path}:2: invalid UTF-8 at byte 15$"):
        prepare(str(path), tt(), 64, "truncate")


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        sft_data.prepare_sft("/nonexistent.jsonl", tt(), 64, "truncate")


def test_too_long_sft_is_truncated_dropped_or_rejected_and_counted(jsonl):
    short = {"prompt": "q", "completion": "a"}
    long = {"prompt": "q", "completion": "x" * 200}
    long_prompt = {"prompt": "p" * 200, "completion": "a"}
    path = jsonl([short, long, long_prompt])
    n_long = len(tt().render(sft_data.conversation(long, "")[:])[0])

    examples, stats = sft_data.prepare_sft(path, tt(), 64, "truncate")
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped_no_target) == (3, 2, 1, 1)
    assert stats.tokens_cut == n_long - 65
    assert all(len(e["inputs"]) <= 64 for e in examples)
    # The truncated example keeps its first 65 tokens; its targets are still the assistant's own tokens.
    cut = examples[1]
    assert len(cut["inputs"]) == 64 and cut["loss_mask"][-1] == 1 and cut["targets"][-1] == ord("x")

    examples, stats = sft_data.prepare_sft(path, tt(), 64, "drop")
    assert (stats.kept, stats.dropped_too_long, stats.truncated) == (1, 2, 0) and len(examples) == 1

    with pytest.raises(DataError, match=f"{path}:2: the example has {n_long} tokens, more than the window of 65"):
        sft_data.prepare_sft(path, tt(), 64, "error")


def test_too_long_dpo_keeps_prompt_end_and_cuts_responses(jsonl):
    path = jsonl([{"prompt": "p" * 100 + "END", "chosen": "c" * 10, "rejected": "r" * 100},
                  {"prompt": "q", "chosen": "a", "rejected": "b"}])
    pairs, stats = dpo_data.prepare_dpo(path, tt(), 64, "truncate")
    assert (stats.pairs, stats.kept, stats.truncated) == (2, 2, 1)
    chosen, rejected = pairs[0]["chosen"], pairs[0]["rejected"]
    # Same prompt on both sides, its end kept (the assistant header comes last), at least half the window.
    n_prompt = int(np.argmax(chosen["loss_mask"])) + 1  # the first target is predicted from the last prompt token
    assert np.array_equal(chosen["inputs"][:n_prompt], rejected["inputs"][:n_prompt]) and n_prompt >= 32
    assert bytes(t for t in chosen["inputs"][:n_prompt] if t < 256).endswith(b"END" + b"assistant\n\n")
    assert rejected["loss_mask"].sum() == 65 - n_prompt and chosen["loss_mask"].sum() == 11
    pairs, stats = dpo_data.prepare_dpo(path, tt(), 64, "drop")
    assert (stats.kept, stats.dropped_too_long) == (1, 1)
    with pytest.raises(DataError, match=f"{path}:1: the pair has"):
        dpo_data.prepare_dpo(path, tt(), 64, "error")


def test_dpo_pair_identical_after_truncation_is_dropped_and_counted(jsonl):
    # Both responses share a prefix longer than the room the prompt leaves: cut, they would be the same row.
    path = jsonl([{"prompt": "p" * 40, "chosen": "s" * 40 + "good", "rejected": "s" * 40 + "bad"},
                  {"prompt": "q", "chosen": "a", "rejected": "b"}])
    pairs, stats = dpo_data.prepare_dpo(path, tt(), 64, "truncate")
    assert (stats.pairs, stats.kept, stats.truncated, stats.dropped_identical) == (2, 1, 0, 1)
    assert "1 dropped as identical after truncation" in stats.summary()
    assert all(not np.array_equal(p["chosen"]["inputs"], p["rejected"]["inputs"]) for p in pairs)


def test_packing_keeps_every_token_and_separates_segments(jsonl):
    rows = [{"prompt": "q" * n, "completion": "a" * (n % 7 + 1)} for n in range(1, 12)]
    examples, _ = sft_data.prepare_sft(jsonl(rows), tt(), 64, "error")
    batches = list(sft_data.sft_dataset(examples, seq_len=64, batch_size=2, seed=0, repeat=False))
    packed = [b for b in batches]
    segments = []
    for b in packed:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            assert np.all(b["loss_mask"][r][seg == 0] == 0)
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(b["positions"][r][idx], np.arange(len(idx)))
                segments.append(tuple(b["inputs"][r][idx]))
    assert sorted(segments) == sorted(tuple(e["inputs"]) for e in examples)
    assert sum(b["segment_ids"].shape[0] for b in packed) < len(examples)  # several per window


def test_bundled_examples_are_valid():
    from litespark_jax.posttrain.trainer import EXAMPLES_DIR

    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        examples, stats = sft_data.prepare_sft(str(EXAMPLES_DIR / name), tt(), 1024, "error")
        assert stats.kept == stats.examples > 10
    for name in ("dpo_train.jsonl", "dpo_eval.jsonl"):
        pairs, stats = dpo_data.prepare_dpo(str(EXAMPLES_DIR / name), tt(), 512, "error")
        assert stats.kept == stats.pairs > 10
    size = sum((EXAMPLES_DIR / n).stat().st_size for n in ("sft_train.jsonl", "sft_eval.jsonl", "dpo_train.jsonl",
                                                          "dpo_eval.jsonl"))
    assert size < 2 * 1024 * 1024


def test_unpacked_pipeline_is_one_conversation_per_row(jsonl):
    rows = [{"prompt": "q" * n, "completion": "a" * n} for n in range(1, 6)]
    examples, _ = sft_data.prepare_sft(jsonl(rows), tt(), 64, "error")
    batches = list(sft_data.sft_dataset(examples, seq_len=64, batch_size=2, seed=0, pack=False, repeat=False))
    assert [b["inputs"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        assert set(np.unique(b["segment_ids"])) <= {0, 1}
        assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0)
    # Training order: shuffled, a new permutation each epoch, every example once per epoch.
    it = iter(sft_data.sft_dataset(examples, seq_len=64, batch_size=5, seed=0, pack=False))
    epochs = [next(it)["inputs"] for _ in range(2)]
    for epoch in epochs:
        assert sorted(map(tuple, epoch)) == sorted(tuple(sft_data.pad_example(e, 64)["inputs"]) for e in examples)
