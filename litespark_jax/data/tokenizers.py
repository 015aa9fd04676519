"""Tokenizers behind one small protocol: byte-level (default, no files), Hugging Face tokenizer.json, SentencePiece.

`encode` never adds specials: the packer frames every document as BOS + tokens + EOS itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from litespark_jax.errors import DataError

HF_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
BYTE_FILE = "byte_tokenizer.json"

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, trainer and exporter need from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> None: ...


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids as int32, via the tokenizer's fast path when it has one."""
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:
        return fast(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS=256, EOS=257, PAD=258. Needs no files and never sees an unknown token."""

    name = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BYTE_FILE), "w") as f:
            json.dump({"type": "byte", "vocab_size": self.vocab_size}, f)


class HuggingFaceTokenizer:
    """A `tokenizers` tokenizer.json; BOS/EOS/PAD are looked up by their usual names (PAD falls back to EOS)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HFTokenizer

            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(f"data.tokenizer: cannot load {path} as a Hugging Face tokenizer.json ({e})") from e
        # A document that mentions "</s>" or "<|eot_id|>" means the text, not the token: without this, `tokenizers`
        # matches special tokens inside raw text (add_special_tokens=False only turns off the post-processor).
        self._tok.encode_special_tokens = True
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(_BOS_NAMES, "BOS")
        self.eos_id = self._special(_EOS_NAMES, "EOS")
        pad = [self._tok.token_to_id(n) for n in _PAD_NAMES if self._tok.token_to_id(n) is not None]
        self.pad_id = pad[0] if pad else self.eos_id
        self.name = f"hf:{os.path.basename(path)}@{_file_digest(path)}"

    def _special(self, names: Sequence[str], what: str) -> int:
        for n in names:
            token_id = self._tok.token_to_id(n)
            if token_id is not None:
                return token_id
        raise DataError(f"data.tokenizer: {self.path} has no {what} token (looked for {', '.join(names)})")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, HF_FILE))


class SentencePieceTokenizer:
    """A SentencePiece `.model`; PAD falls back to EOS when the model has none."""

    def __init__(self, path: str):
        try:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise DataError(f"data.tokenizer: cannot load {path} as a SentencePiece model ({e})") from e
        self.path = path
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"data.tokenizer: {path} defines no BOS or EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id})")
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.name = f"sentencepiece:{os.path.basename(path)}@{_file_digest(path)}"

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SENTENCEPIECE_FILE), "wb") as f:
            f.write(self._sp.serialized_model_proto())


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte", a tokenizer.json, a .model, or a directory holding one of them (relative to the cwd)."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        for file_name in (HF_FILE, SENTENCEPIECE_FILE, BYTE_FILE):
            if os.path.isfile(os.path.join(path, file_name)):
                return load_tokenizer(os.path.join(path, file_name))
        raise DataError(f"data.tokenizer: directory {path} holds no {HF_FILE}, {SENTENCEPIECE_FILE} or {BYTE_FILE}")
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer: {spec!r} is not 'byte' and no such file exists (cwd {os.getcwd()})")
    if os.path.basename(path) == BYTE_FILE:
        return ByteTokenizer()
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)


def build_tokenizer(cfg) -> Tokenizer:
    """The tokenizer a DataConfig (or a plain spec string) names."""
    return load_tokenizer(cfg if isinstance(cfg, str) else cfg.tokenizer)
