"""The prepared (offline-tokenized) path yields exactly the batches of the on-the-fly path."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from litespark_jax.data import DataConfig, build_tokenizer, make_eval_iterator, make_train_iterator
from litespark_jax.data.bpe_train import train_bpe
from litespark_jax.errors import DataError
from litespark_jax.prepare import main as prepare_cli
from tests.data.conftest import make_docs, records, write_jsonl


def batches(cfg, tok, steps, **kw):
    it = make_train_iterator(cfg, tok, seq_len=24, global_batch_size=4, seed=3, process_index=0, process_count=1, **kw)
    return [next(it) for _ in range(steps)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_byte_corpus_gives_identical_batches(corpus, byte_tokenizer, tmp_path, workers):
    out = tmp_path / "prepared"
    assert prepare_cli(["--files", corpus["cfg"].train_files, "--out", str(out), "--workers", str(workers),
                        "--no-progress"]) == 0
    prepared_cfg = dataclasses.replace(corpus["cfg"], train_files=str(out))
    assert_same(batches(corpus["cfg"], byte_tokenizer, 40), batches(prepared_cfg, byte_tokenizer, 40))
    explicit = dataclasses.replace(prepared_cfg, format="prepared")
    assert_same(batches(corpus["cfg"], byte_tokenizer, 3), batches(explicit, byte_tokenizer, 3))


def test_prepared_bpe_corpus_train_and_eval(corpus, tmp_path):
    tok_path = train_bpe(corpus["cfg"].train_files, str(tmp_path / "tok"), vocab_size=320, progress=False)
    cfg = dataclasses.replace(corpus["cfg"], tokenizer=tok_path)
    tok = build_tokenizer(cfg)
    assert prepare_cli(["--files", cfg.train_files, "--tokenizer", tok_path, "--out", str(tmp_path / "tr"),
                        "--no-progress"]) == 0
    assert prepare_cli(["--files", cfg.validation_files, "--tokenizer", tok_path, "--out", str(tmp_path / "va"),
                        "--no-progress"]) == 0
    prepared = dataclasses.replace(cfg, train_files=str(tmp_path / "tr"), validation_files=str(tmp_path / "va"))
    assert_same(batches(cfg, tok, 20), batches(prepared, tok, 20))
    kw = dict(seq_len=16, global_batch_size=2, process_index=0, process_count=1)
    assert_same(list(make_eval_iterator(cfg, tok, **kw)), list(make_eval_iterator(prepared, tok, **kw)))


def test_prepared_with_another_tokenizer_is_refused(corpus, byte_tokenizer, tmp_path):
    out = tmp_path / "prepared"
    assert prepare_cli(["--files", corpus["cfg"].train_files, "--out", str(out), "--no-progress"]) == 0
    tok_path = train_bpe(corpus["cfg"].train_files, str(tmp_path / "tok"), vocab_size=300, progress=False)
    cfg = dataclasses.replace(corpus["cfg"], train_files=str(out), tokenizer=tok_path)
    with pytest.raises(DataError, match="prepared with tokenizer byte"):
        batches(cfg, build_tokenizer(cfg), 1)


def test_prepare_refuses_to_overwrite_and_reports_bad_data(corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert prepare_cli(["--files", corpus["cfg"].train_files, "--out", str(out), "--no-progress"]) == 0
    assert prepare_cli(["--files", corpus["cfg"].train_files, "--out", str(out), "--no-progress"]) == 2
    assert "already holds a prepared corpus" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert prepare_cli(["--files", str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_an_overwrite_that_fails_leaves_no_corpus_claiming_the_old_tokenizer(corpus, tmp_path, capsys):
    from litespark_jax.data.prepared import is_prepared

    out = tmp_path / "prepared"
    tok_path = train_bpe(corpus["cfg"].train_files, str(tmp_path / "tok"), vocab_size=320, progress=False)
    assert prepare_cli(["--files", corpus["cfg"].train_files, "--out", str(out), "--no-progress",
                        "--tokenizer", tok_path]) == 0
    bad = tmp_path / "bad" / "b.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "bad" / "a.jsonl").write_text('{"text": "first shard, written before the bad one"}\n')
    assert prepare_cli(["--files", str(tmp_path / "bad" / "*.jsonl"), "--out", str(out), "--no-progress",
                        "--overwrite"]) == 2
    assert "b.jsonl:2: malformed JSON" in capsys.readouterr().err
    # The old metadata (HF tokenizer) no longer describes the byte-tokenized first shard, and the old tokenizer.json
    # is not left beside the new byte tokenizer's file.
    assert not is_prepared(str(out))
    assert os.listdir(out / "tokenizer") == ["byte_tokenizer.json"]


def test_prepared_corpus_with_an_all_empty_shard_is_readable(tmp_path, byte_tokenizer):
    # The first input has documents but no tokens: its shard is listed (document ids) but has no zarr array.
    write_jsonl(tmp_path / "raw" / "a_empty.jsonl", records(["", ""]))
    write_jsonl(tmp_path / "raw" / "b_ok.jsonl", records(make_docs(20, seed=4)))
    raw = DataConfig(train_files=str(tmp_path / "raw" / "*.jsonl"), prefetch=2)
    out = tmp_path / "prepared"
    assert prepare_cli(["--files", raw.train_files, "--out", str(out), "--no-progress"]) == 0
    assert_same(batches(raw, byte_tokenizer, 10),
                batches(dataclasses.replace(raw, train_files=str(out)), byte_tokenizer, 10))
