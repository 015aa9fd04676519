"""Read SlimPajama-style shards (`*.jsonl` / `*.jsonl.zst`, one `{"text", "meta"}` object per line) into memory.

Every problem is reported as a one-line DataError naming the file (and line), or, with on_bad_record="skip", counted
and logged once per file, so a bad shard in a 600-file corpus is found without a debugger.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import numpy as np
import zstandard

from litespark_jax.errors import DataError

log = logging.getLogger(__name__)

UNKNOWN_SET = "unknown"


def resolve_files(pattern: str, key: str) -> list[str]:
    """Expand one or more comma-separated globs (relative to the cwd, `**` allowed) into a sorted file list."""
    files: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        expanded = os.path.expanduser(part)
        matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
        if not matches:
            raise DataError(f"{key}: glob {part!r} matches no files (resolved against {os.getcwd()})")
        files.extend(matches)
    if not files:
        raise DataError(f"{key}: no file pattern given")
    return sorted(dict.fromkeys(files))


def read_bytes(path: str) -> bytes:
    """Whole file contents, zstd-decompressed for `.zst`; a truncated or corrupt stream is an error, never a short read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if not path.endswith(".zst"):
        return raw
    parts = []
    remaining = raw
    try:
        while remaining:
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            parts.append(decompressor.decompress(remaining))
            if not decompressor.eof:
                raise DataError(f"{path}: truncated .zst file (the zstd stream ends before its frame does)")
            remaining = decompressor.unused_data
    except zstandard.ZstdError as e:
        raise DataError(f"{path}: corrupt .zst file ({e})") from e
    return b"".join(parts)


@dataclasses.dataclass
class ShardDocuments:
    """The documents of one shard, in file order."""

    path: str
    texts: list[str]
    set_names: list[str]
    line_numbers: list[int]
    skipped: int = 0


def _parse_line(line: bytes) -> tuple[str, str]:
    """(text, set name) of one JSON line; ValueError with a short reason otherwise."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        raise ValueError("missing 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise ValueError(f"'text' is {type(text).__name__}, expected a string")
    try:  # JSON's \ud83d escapes can spell half an emoji: valid JSON, but not text any tokenizer takes
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"'text' holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start})") from None
    meta = obj.get("meta")
    set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return text, set_name if isinstance(set_name, str) else UNKNOWN_SET


def read_jsonl_shard(path: str, on_bad_record: str = "error") -> ShardDocuments:
    """Parse every line of a shard; blank lines are ignored; an empty shard is an error (or a skip warning)."""
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as Windows tools write
        data = data[3:]
    shard = ShardDocuments(path, [], [], [])
    first_problem = ""
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text, set_name = _parse_line(line)
        except ValueError as e:
            if on_bad_record != "skip":
                raise DataError(f"{path}:{lineno}: {e}") from None
            shard.skipped += 1
            first_problem = first_problem or f"line {lineno}: {e}"
            continue
        shard.texts.append(text)
        shard.set_names.append(set_name)
        shard.line_numbers.append(lineno)
    if shard.skipped:
        log.warning("%s: skipped %d bad record(s) (first: %s)", path, shard.skipped, first_problem)
    if not shard.texts:
        if on_bad_record != "skip":
            raise DataError(f"{path}: empty shard (no documents)")
        log.warning("%s: empty shard (no documents), skipped", path)
    return shard


@dataclasses.dataclass
class TextCorpus:
    """All documents matched by a glob, concatenated in sorted-file order; doc id = position here."""

    files: list[str]
    texts: list[str]
    set_index: np.ndarray
    set_names: list[str]
    origins: list[tuple[int, int]]
    skipped: int

    def where(self, doc_id: int) -> str:
        """`file:line` of a document, for error messages."""
        file_index, line = self.origins[doc_id]
        return f"{self.files[file_index]}:{line}"


def load_text_corpus(pattern: str, on_bad_record: str = "error", key: str = "data.train_files") -> TextCorpus:
    """Read every shard matched by `pattern`."""
    files = resolve_files(pattern, key)
    texts: list[str] = []
    names: list[str] = []
    origins: list[tuple[int, int]] = []
    skipped = 0
    for file_index, path in enumerate(files):
        shard = read_jsonl_shard(path, on_bad_record)
        texts.extend(shard.texts)
        names.extend(shard.set_names)
        origins.extend((file_index, line) for line in shard.line_numbers)
        skipped += shard.skipped
    if not texts:
        raise DataError(f"{key}: {pattern!r} holds no usable documents")
    set_names = sorted(set(names))
    lookup = {name: i for i, name in enumerate(set_names)}
    set_index = np.fromiter((lookup[n] for n in names), dtype=np.int32, count=len(names))
    return TextCorpus(files, texts, set_index, set_names, origins, skipped)
