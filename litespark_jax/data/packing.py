"""Packing: documents framed as BOS + tokens + EOS, concatenated into one stream, cut into fixed windows.

Window w of a stream covers stream tokens [w*L, w*L + L + 1): inputs are its first L tokens, targets its last L, so
consecutive windows overlap by one token and no token is lost. A document longer than a window simply continues in
the next window (split, never dropped). Within a window every document piece gets its own segment id (1, 2, ...)
and positions restart at 0, so attention never crosses a document boundary; `loss_mask` is 0 where the target
belongs to another document than the input (the EOS -> next BOS step) and on padding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def pack_window(pieces: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row from the <= L+1 stream tokens of a window, given as one array per document piece, in order."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    pieces = [p for p, n in zip(pieces, lengths) if n]
    lengths = lengths[lengths > 0]
    total = int(lengths.sum())
    window = np.full(seq_len + 1, pad_id, dtype=np.int32)
    if total:
        window[:total] = np.concatenate(pieces)
    doc = np.zeros(seq_len + 1, dtype=np.int32)
    doc[:total] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    starts = np.zeros(seq_len + 1, dtype=np.int64)
    starts[:total] = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(seq_len + 1, dtype=np.int64) - starts
    positions[total:] = 0
    same_doc = (doc[:-1] == doc[1:]) & (doc[1:] > 0)
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "segment_ids": doc[:-1],
        "positions": positions[:-1].astype(np.int32),
        "loss_mask": same_doc.astype(np.float32),
    }


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}


class DocStream:
    """One packed token stream over a (possibly infinite) sequence of documents, with lazily computed offsets.

    `doc_ids(k0, k1)` gives the ids of stream documents k0..k1-1 (fewer at the end of a finite stream). Offsets are
    computed forward only as far as needed and old ones dropped, so memory stays flat over a long run; asking for a
    window before the retained history restarts from the beginning (only happens after `set_state` to an earlier step).
    """

    CHUNK = 128
    HISTORY_WINDOWS = 64

    def __init__(self, doc_ids: Callable[[int, int], np.ndarray], lengths: Callable[[np.ndarray], np.ndarray],
                 seq_len: int):
        self._doc_ids = doc_ids
        self._lengths = lengths
        self._seq_len = seq_len
        self._restart()

    def _restart(self) -> None:
        self._k0 = 0  # stream index of self._ids[0]
        self._base = 0  # stream token offset where document self._k0 starts
        self._ids = np.empty(0, dtype=np.int64)
        self._ends = np.empty(0, dtype=np.int64)  # stream offset one past each framed document
        self._exhausted = False
        self._seen_tokens = 0
        self._seen_docs = 0

    def _extend(self, need: int = 1) -> bool:
        """Append enough documents to cover about `need` more tokens (lengths may mean tokenizing: don't overshoot)."""
        if self._exhausted:
            return False
        k = self._k0 + len(self._ids)
        average = self._seen_tokens / self._seen_docs if self._seen_docs else float(need)
        count = int(min(self.CHUNK, max(1, -(-need // max(1, int(average))) + 1)))
        ids = np.asarray(self._doc_ids(k, k + count), dtype=np.int64)
        if len(ids) < count:
            self._exhausted = True
        if not len(ids):
            return False
        framed = self._lengths(ids).astype(np.int64) + 2
        self._seen_tokens += int(framed.sum())
        self._seen_docs += len(ids)
        start = self._ends[-1] if len(self._ends) else self._base
        self._ids = np.concatenate([self._ids, ids])
        self._ends = np.concatenate([self._ends, start + np.cumsum(framed)])
        return True

    def _drop_before(self, offset: int) -> None:
        n = int(np.searchsorted(self._ends, offset, side="right"))
        if n:
            self._base = int(self._ends[n - 1])
            self._k0 += n
            self._ids = self._ids[n:]
            self._ends = self._ends[n:]

    def total_tokens(self, limit: int | None = None) -> int:
        """Length of a finite stream, or a value >= `limit` once the stream is known to be at least that long."""
        while limit is None or not len(self._ends) or self._ends[-1] < limit:
            if not self._extend(1 << 40 if limit is None else limit - (int(self._ends[-1]) if len(self._ends) else 0)):
                break
        return int(self._ends[-1]) if len(self._ends) else self._base

    def window_requests(self, window: int) -> list[tuple[int, int, int, bool, bool]]:
        """Pieces of window `window`: (doc_id, lo, hi, has_bos, has_eos) with [lo, hi) in document-token coordinates."""
        a = window * self._seq_len
        b = a + self._seq_len + 1
        if a < self._base:
            self._restart()
        keep_from = max(0, a - self.HISTORY_WINDOWS * self._seq_len)
        while not len(self._ends) or self._ends[-1] <= a:
            if not self._extend(b - (int(self._ends[-1]) if len(self._ends) else self._base)):
                break
            self._drop_before(keep_from)
        self._drop_before(keep_from)
        while len(self._ends) and self._ends[-1] < b and self._extend(b - int(self._ends[-1])):
            pass
        first = int(np.searchsorted(self._ends, a, side="right"))
        pieces = []
        for m in range(first, len(self._ids)):
            start = int(self._ends[m - 1]) if m else self._base
            end = int(self._ends[m])
            if start >= b:
                break
            lo, hi = max(a, start) - start, min(b, end) - start  # framed coordinates: 0 = BOS, end-start-1 = EOS
            n = end - start - 2
            pieces.append((int(self._ids[m]), max(lo - 1, 0), min(hi - 1, n), lo == 0, hi == n + 2))
        return pieces


def frame_pieces(requests, token_slices, bos_id: int, eos_id: int) -> list[np.ndarray]:
    """Re-attach the BOS/EOS that `window_requests` marked to the token slices read from the store."""
    pieces = []
    for (_, _, _, has_bos, has_eos), tokens in zip(requests, token_slices):
        parts = []
        if has_bos:
            parts.append(np.array([bos_id], dtype=np.int32))
        parts.append(np.asarray(tokens, dtype=np.int32))
        if has_eos:
            parts.append(np.array([eos_id], dtype=np.int32))
        pieces.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return pieces


def unpack_documents(stream: np.ndarray, bos_id: int, eos_id: int) -> list[np.ndarray]:
    """Inverse of packing for a stream that starts at a document start: the token ids of each complete document."""
    docs = []
    start = None
    for i, token in enumerate(stream.tolist()):
        if token == bos_id:
            start = i + 1
        elif token == eos_id and start is not None:
            docs.append(stream[start:i])
            start = None
    return docs


def stream_of_row(batches: list[dict[str, np.ndarray]], row: int) -> np.ndarray:
    """Concatenate one row over consecutive batches back into its stream (windows overlap by one token)."""
    parts = [b["inputs"][row] for b in batches] + [batches[-1]["targets"][row][-1:]]
    return np.concatenate(parts)
