"""Bad data fails with one line naming file and line, or (on_bad_record="skip") is counted and skipped."""

from __future__ import annotations

import json
import logging

import pytest
import zstandard

from tests.data.conftest import records, write_jsonl
from litespark_jax.data import DataConfig, build_tokenizer, make_train_iterator
from litespark_jax.data.sources import load_text_corpus
from litespark_jax.errors import ConfigError, DataError

GOOD = json.dumps({"text": "fine", "meta": {"redpajama_set_name": "S"}})


def first_batch(cfg, tok):
    it = make_train_iterator(cfg, tok, seq_len=8, global_batch_size=1, seed=0, process_index=0, process_count=1)
    return next(it)


@pytest.mark.parametrize("bad_line,reason", [
    ('{"text": "unterminated', "malformed JSON"),
    ('{"meta": {}}', "missing 'text'"),
    ('{"text": 42}', "'text' is int"),
    ('["text"]', "expected a JSON object"),
    ('{"text": "emoji cut \\ud83d here"}', r"'text' holds a lone UTF-16 surrogate \('\\ud83d' at character 10\)"),
])
def test_bad_json_line_names_file_and_line(tmp_path, byte_tokenizer, bad_line, reason):
    path = write_jsonl(tmp_path / "shard.jsonl", [GOOD, GOOD, bad_line, GOOD])
    cfg = DataConfig(train_files=str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match=rf"shard\.jsonl:3: {reason}") as info:
        first_batch(cfg, byte_tokenizer)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_invalid_utf8_names_file_and_line(tmp_path, byte_tokenizer):
    path = tmp_path / "shard.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"shard\.jsonl:2: invalid UTF-8"):
        first_batch(DataConfig(train_files=str(path)), byte_tokenizer)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "shard.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert load_text_corpus(str(path)).texts == ["fine", "fine"]


def test_skip_mode_counts_and_warns(tmp_path, byte_tokenizer, caplog):
    write_jsonl(tmp_path / "shard.jsonl", [GOOD, "{oops", '{"text": null}', GOOD])
    with caplog.at_level(logging.WARNING):
        corpus = load_text_corpus(str(tmp_path / "shard.jsonl"), on_bad_record="skip")
    assert corpus.texts == ["fine", "fine"] and corpus.skipped == 2
    assert "skipped 2 bad record(s)" in caplog.text and "line 2" in caplog.text
    first_batch(DataConfig(train_files=str(tmp_path / "shard.jsonl"), on_bad_record="skip"), byte_tokenizer)


def test_truncated_zst(tmp_path, byte_tokenizer):
    data = zstandard.ZstdCompressor().compress(("\n".join([GOOD] * 500) + "\n").encode())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst: truncated \.zst"):
        first_batch(DataConfig(train_files=str(path)), byte_tokenizer)


def test_corrupt_zst(tmp_path, byte_tokenizer):
    path = tmp_path / "junk.jsonl.zst"
    path.write_bytes(b"this is not zstd at all")
    with pytest.raises(DataError, match=r"junk\.jsonl\.zst: corrupt \.zst"):
        first_batch(DataConfig(train_files=str(path)), byte_tokenizer)


def test_empty_shard(tmp_path, byte_tokenizer, caplog):
    write_jsonl(tmp_path / "a.jsonl", records(["some text"]))
    (tmp_path / "b.jsonl").write_bytes(b"\n\n")
    with pytest.raises(DataError, match=r"b\.jsonl: empty shard"):
        first_batch(DataConfig(train_files=str(tmp_path / "*.jsonl")), byte_tokenizer)
    with caplog.at_level(logging.WARNING):
        first_batch(DataConfig(train_files=str(tmp_path / "*.jsonl"), on_bad_record="skip"), byte_tokenizer)
    assert "empty shard" in caplog.text


def test_glob_matching_nothing(tmp_path, byte_tokenizer):
    with pytest.raises(DataError, match=r"data\.train_files: glob .*nothing-here.* matches no files"):
        first_batch(DataConfig(train_files=str(tmp_path / "nothing-here" / "*.jsonl.zst")), byte_tokenizer)


def test_validation_glob_matching_nothing_names_its_key(tmp_path, byte_tokenizer):
    from litespark_jax.data import make_eval_iterator

    cfg = DataConfig(validation_files=str(tmp_path / "none*.jsonl"))
    with pytest.raises(DataError, match=r"data\.validation_files: glob"):
        make_eval_iterator(cfg, byte_tokenizer, seq_len=8, global_batch_size=1, process_index=0, process_count=1)


@pytest.mark.parametrize("name,content,match", [
    ("broken.json", b"{not json", "cannot load .*broken.json as a Hugging Face tokenizer.json"),
    ("broken.model", b"\x00garbage", "cannot load .*broken.model as a SentencePiece model"),
])
def test_tokenizer_file_that_does_not_load(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / name)))


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.tokenizer: .*nope\.json.* no such file"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")))


@pytest.mark.parametrize("field,value", [
    ("format", "parquet"), ("on_bad_record", "ignore"), ("num_workers", -1), ("shuffle", "yes"),
    ("mixture", {"A": -1}), ("mixture", {"A": 0}), ("mixture", {"A": float("nan")}), ("mixture", {"A": float("inf")}),
    ("train_files", ""), ("tokenizer", None),
])
def test_config_validate_names_the_key(field, value):
    with pytest.raises(ConfigError, match=rf"^data\.{field}"):
        DataConfig(**{field: value}).validate()


def test_default_config_is_valid_and_points_into_the_package():
    cfg = DataConfig()
    cfg.validate()
    assert "litespark_jax" in cfg.train_files and "corpus" in cfg.validation_files
