"""Tokenizers: byte (default), trained BPE tokenizer.json, SentencePiece; save/load keeps ids identical."""

from __future__ import annotations

import io

import pytest

from tests.data.conftest import make_docs
from litespark_jax.data import ByteTokenizer, DataConfig, Tokenizer, build_tokenizer, load_tokenizer
from litespark_jax.tokenizer import main as tokenizer_cli

SAMPLES = ["hello world", "", "café → λ", "def f(x):\n    return x  # done\n"]


def test_byte_tokenizer_round_trip_and_ids():
    tok = build_tokenizer(DataConfig())
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids


def test_trained_bpe_tokenizer(corpus, tmp_path):
    out = tmp_path / "tok"
    assert tokenizer_cli(["train", "--files", corpus["cfg"].train_files, "--vocab-size", "300", "--out", str(out),
                          "--no-progress"]) == 0
    tok = build_tokenizer(DataConfig(tokenizer=str(out / "tokenizer.json")))
    assert tok.vocab_size == 300
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    for text in SAMPLES + corpus["train"][:5]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Special tokens written in a document are its text: never BOS/EOS/PAD in the middle of a document.
    literal = "see </s> and <s> or <pad> here"
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(tok.encode(literal))
    assert tok.decode(tok.encode(literal)) == literal
    text = corpus["train"][3]
    assert len(tok.encode(text)) < len(text.encode())  # merges were learned
    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.encode(text) == tok.encode(text) and again.name == tok.name


def test_tokenizer_cli_reports_bad_input(tmp_path, capsys):
    assert tokenizer_cli(["train", "--files", str(tmp_path / "none*.jsonl"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --files: glob")


def test_sentencepiece_model(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(make_docs(200, seed=9, max_len=80)), model_writer=model, vocab_size=320, minloglevel=2,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, pad_id=3, bos_id=1, eos_id=2, unk_id=0)
    path = tmp_path / "sp.model"
    path.write_bytes(model.getvalue())
    tok = build_tokenizer(DataConfig(tokenizer=str(path)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3) and tok.vocab_size == 320
    text = "abc de"
    assert tok.decode(tok.encode(text)) == text
    tok.save(str(tmp_path / "saved"))
    assert load_tokenizer(str(tmp_path / "saved")).encode(text) == tok.encode(text)


def test_byte_tokenizer_save_and_load(tmp_path):
    ByteTokenizer().save(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


@pytest.mark.parametrize("flags, message", [
    (["--min-frequency", "-1"], "--min-frequency -1: must not be negative"),  # was an OverflowError traceback
    (["--max-docs", "0"], "--max-docs 0: must be at least 1"),
])
def test_train_cli_refuses_bad_counts_before_reading_anything(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        tokenizer_cli(["train", *flags, "--out", str(tmp_path / "tok")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()
