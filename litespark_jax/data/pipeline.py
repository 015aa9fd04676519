"""Train and eval iterators: grain pipelines whose batch at step s is a pure function of (data, seed, s).

Global layout. The training data is `global_batch_size` packed row streams: row r of the global batch reads global
document slots r, r+B, r+2B, ... of the seeded document order (mixture.py), packed back to back (packing.py). Window s
of row r is row r of the batch at step s. Nothing depends on the number of processes: process p builds only rows
[p*B/P, (p+1)*B/P) and reads only their documents, and the iterator state is just the global step, so a run resumed
with a different process count sees exactly the batches an uninterrupted run would.

The grain part: `MapDataset.range(step, ...)` -> `.map(build local batch)` -> `to_iter_dataset` with a prefetch
thread (or `mp_prefetch` worker processes), wrapped in a `grain.DatasetIterator` whose state is {"step": ...}.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import math
import os
from typing import Any

import grain
import numpy as np

from litespark_jax.data import prepared
from litespark_jax.data.config import DataConfig
from litespark_jax.data.documents import TextDocumentStore
from litespark_jax.data.locking import PicklableLock
from litespark_jax.data.mixture import DocumentOrder
from litespark_jax.data.packing import DocStream, frame_pieces, pack_window, stack_rows
from litespark_jax.data.sources import load_text_corpus, resolve_files
from litespark_jax.data.tokenizers import Tokenizer
from litespark_jax.errors import ConfigError, DataError

_STORE_CACHE: collections.OrderedDict[tuple, Any] = collections.OrderedDict()


def open_store(files: str, cfg: DataConfig, tokenizer: Tokenizer, key: str):
    """The document store for a glob or prepared directory; cached per process (eval reopens it every eval)."""
    fmt = cfg.format
    if fmt == "auto":
        fmt = "prepared" if prepared.is_prepared(files) else "jsonl"
    if fmt == "prepared":
        cache_key = ("prepared", os.path.abspath(files), tokenizer.name)
    else:
        paths = resolve_files(files, key)
        stamps = tuple((p, st.st_mtime_ns, st.st_size) for p in map(os.path.abspath, paths) for st in [os.stat(p)])
        cache_key = ("jsonl", stamps, cfg.on_bad_record, tokenizer.name, cfg.token_cache_docs)
    store = _STORE_CACHE.get(cache_key)
    if store is None:
        if fmt == "prepared":
            store = prepared.PreparedDocumentStore(files, tokenizer, key)
        else:
            store = TextDocumentStore(load_text_corpus(files, cfg.on_bad_record, key), tokenizer, cfg.token_cache_docs)
        _STORE_CACHE[cache_key] = store
        while len(_STORE_CACHE) > 4:
            _STORE_CACHE.popitem(last=False)
    return store


def _process_layout(global_batch_size: int, process_index: int | None, process_count: int | None) -> range:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(f"train.global_batch_size {global_batch_size} must be a positive multiple of the "
                          f"{process_count} blocks of rows the processes build")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is outside 0..{process_count - 1}")
    local = global_batch_size // process_count
    return range(process_index * local, (process_index + 1) * local)


_ROW_POOL = None


def _row_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _ROW_POOL
    if _ROW_POOL is None:
        _ROW_POOL = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="litespark-rows")
    return _ROW_POOL


def _requests_of(row_window):
    stream, window = row_window
    return stream.window_requests(window) if stream is not None else []


class _BatchBuilder(PicklableLock):
    """Builds this process's rows of the global batch at a step; thread-safe, picklable for grain workers."""

    def __init__(self, store, tokenizer: Tokenizer, seq_len: int):
        self.store = store
        self.seq_len = seq_len
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        PicklableLock.__init__(self)

    rows_share_a_stream = False
    """True when rows read windows of one ``DocStream``, which is not thread-safe: then rows are built in turn."""

    def _row_windows(self, step: int) -> list[tuple[DocStream, int] | None]:
        raise NotImplementedError

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        with self._lock:
            row_windows = self._row_windows(int(step))
            parallel = getattr(self.store, "tokenizes_slowly", False) and not self.rows_share_a_stream
            if parallel and len(row_windows) > 1:
                # Each row stream is independent and the tokenizer releases the GIL: tokenize rows on all cores.
                requests = list(_row_pool().map(_requests_of, row_windows))
            else:
                requests = [_requests_of(row_window) for row_window in row_windows]
            flat = [(doc, lo, hi) for row in requests for doc, lo, hi, _, _ in row]
            slices = self.store.read(flat)
        rows, i = [], 0
        for row in requests:
            pieces = frame_pieces(row, slices[i:i + len(row)], self.bos_id, self.eos_id)
            i += len(row)
            rows.append(pack_window(pieces, self.seq_len, self.pad_id))
        return stack_rows(rows)


class TrainBatchBuilder(_BatchBuilder):
    """Row r of step s = window s of packed row stream r (global slots r, r+B, r+2B, ...)."""

    def __init__(self, store, order: DocumentOrder, tokenizer: Tokenizer, seq_len: int, global_batch_size: int,
                 rows: range):
        super().__init__(store, tokenizer, seq_len)
        self.order = order
        self.global_batch_size = global_batch_size
        self.rows = rows
        self.streams = [DocStream(self._row_doc_ids(r), store.lengths, seq_len) for r in rows]

    def _row_doc_ids(self, row: int):
        def doc_ids(k0: int, k1: int) -> np.ndarray:
            return self.order.doc_ids(row + self.global_batch_size * np.arange(k0, k1, dtype=np.int64))

        return doc_ids

    def row_doc_ids(self, row: int, count: int) -> np.ndarray:
        """The first `count` documents of global row `row`'s stream (for tests and debugging)."""
        return self._row_doc_ids(row)(0, count)

    def _row_windows(self, step):
        return [(stream, step) for stream in self.streams]


class EvalBatchBuilder(_BatchBuilder):
    """One stream of all holdout documents in file order; global row r of batch b = window b*B + r (padded at the end)."""

    rows_share_a_stream = True  # threads moving one stream's window out of order gave other batches each run

    def __init__(self, store, tokenizer: Tokenizer, seq_len: int, global_batch_size: int, rows: range,
                 max_batches: int | None):
        super().__init__(store, tokenizer, seq_len)
        n = len(store)
        self.stream = DocStream(lambda k0, k1: np.arange(min(k0, n), min(k1, n), dtype=np.int64), store.lengths,
                                seq_len)
        limit = None if max_batches is None else max_batches * global_batch_size * seq_len + 1
        total = self.stream.total_tokens(limit)  # with max_batches, tokenize no further than needed
        self.num_windows = max(1, math.ceil((total - 1) / seq_len))
        self.num_batches = math.ceil(self.num_windows / global_batch_size)
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
        self.global_batch_size = global_batch_size
        self.rows = rows

    def _row_windows(self, step):
        windows = [step * self.global_batch_size + r for r in self.rows]
        return [(self.stream, w) if w < self.num_windows else (None, w) for w in windows]


_IDENTITY_SETTINGS = {  # what a user changes to make an identity field differ
    "seed": "train.seed", "seq_len": "train.seq_len", "global_batch_size": "train.global_batch_size",
    "num_docs": "the number of documents in data.train_files", "shuffle": "data.shuffle", "mixture": "data.mixture",
    "documents": "the documents of data.train_files (their sizes)", "tokenizer": "the tokenizer (data.tokenizer)",
}


def check_identity(state: dict[str, Any], identity: dict[str, Any], settings: dict[str, str]) -> None:
    """A DataError naming the setting (``settings[key]``) whose value in a saved data position differs from this
    run's ``identity``: resuming would not continue the same stream of batches. A key missing from an older state
    is not checked."""
    for key, value in identity.items():
        if key in state and state[key] != value:
            raise DataError(f"the checkpoint's data position was saved with {settings.get(key, key)} = "
                            f"{state[key]!r} but this run has {value!r}; resuming would not continue the same "
                            f"stream of batches (restore that setting, or set train.resume_data=false to keep the "
                            f"model and optimizer and start the data stream afresh)")


class BatchIterator(grain.DatasetIterator):
    """Checkpointable iterator over local batches; state = global step, valid across process counts."""

    def __init__(self, builder: _BatchBuilder, *, identity: dict[str, Any], num_steps: int | None = None,
                 num_workers: int = 0, prefetch: int = 4):
        super().__init__()
        self.builder = builder
        self._identity = identity
        self._num_steps = num_steps
        self._num_workers = num_workers
        self._prefetch = prefetch
        self._step = 0
        self._iterator = None

    def _start(self):
        stop = self._num_steps if self._num_steps is not None else 1 << 62
        dataset = grain.MapDataset.range(self._step, max(self._step, stop)).map(self.builder)
        if self._num_workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags; we are not an absl app
                flags.FLAGS.mark_as_parsed()
            iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers, per_worker_buffer_size=max(1, self._prefetch)))
        else:
            threads = 1 if self._prefetch else 0
            iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                                     prefetch_buffer_size=self._prefetch))
        return iter(iter_dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_steps is not None and self._step >= self._num_steps:
            raise StopIteration
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._step += 1
        return batch

    def __bool__(self) -> bool:  # an iterator is truthy even when len() is undefined (grain's handler tests `item or`)
        return True

    def __len__(self) -> int:
        if self._num_steps is None:
            raise TypeError("the train iterator is infinite")
        return self._num_steps

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        check_identity(state, self._identity, _IDENTITY_SETTINGS)
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DataError(f"data iterator state has no valid 'step' (got {step!r})")
        self._step = step
        self._iterator = None


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """Infinite iterator of this process's rows of each global batch: dicts of [B/P, seq_len] arrays."""
    cfg.validate()
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    rows = _process_layout(global_batch_size, process_index, process_count)
    store = open_store(cfg.train_files, cfg, tokenizer, "data.train_files")
    order = DocumentOrder(store.set_index, store.set_names, seed=seed, shuffle=cfg.shuffle, mixture=cfg.mixture)
    builder = TrainBatchBuilder(store, order, tokenizer, seq_len, global_batch_size, rows)
    identity = {"kind": "train", "seed": int(seed), "seq_len": seq_len, "global_batch_size": global_batch_size,
                "num_docs": len(store), "documents": _document_digest(store), "tokenizer": tokenizer.name,
                "shuffle": bool(cfg.shuffle), "mixture": _mixture_key(cfg.mixture)}
    return BatchIterator(builder, identity=identity, num_workers=cfg.num_workers, prefetch=cfg.prefetch)


def _document_digest(store) -> str:
    """A short digest of the document set (ids, sizes, sets), so a resumed iterator notices other data with the
    same document count. Text stores hash character counts (no tokenizing); prepared ones their token counts."""
    digest = hashlib.sha256(np.asarray(store.set_index, dtype=np.int64).tobytes())
    digest.update("\0".join(store.set_names).encode())
    if isinstance(store, TextDocumentStore):
        sizes = np.fromiter((len(text) for text in store.corpus.texts), dtype=np.int64, count=len(store))
    else:
        sizes = np.asarray(store.lengths(np.arange(len(store))), dtype=np.int64)
    digest.update(sizes.tobytes())
    return digest.hexdigest()[:16]


def _mixture_key(mixture) -> list | None:
    return None if not mixture else sorted([str(name), float(weight)] for name, weight in dict(mixture).items())


def check_validation_split(cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """Open the validation split now (cached for the evaluations), so a wrong ``data.validation_files`` fails
    before training rather than at the first evaluation."""
    cfg.validate()
    open_store(cfg.validation_files, cfg, tokenizer, "data.validation_files")


def make_eval_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       max_batches: int | None = None) -> BatchIterator:
    """Finite iterator over the validation split in file order (same dict format; padding has loss_mask 0)."""
    cfg.validate()
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    rows = _process_layout(global_batch_size, process_index, process_count)
    store = open_store(cfg.validation_files, cfg, tokenizer, "data.validation_files")
    builder = EvalBatchBuilder(store, tokenizer, seq_len, global_batch_size, rows, max_batches)
    identity = {"kind": "eval", "seq_len": seq_len, "global_batch_size": global_batch_size}
    return BatchIterator(builder, identity=identity, num_steps=builder.num_batches, num_workers=0,
                         prefetch=min(cfg.prefetch, 2))


def unigram_entropy(cfg: DataConfig, tokenizer: Tokenizer) -> float:
    """Entropy (nats/token) of the validation split's unigram distribution over loss targets (tokens + EOS).

    A model whose validation loss is not well below this has learned nothing beyond token frequencies.
    """
    cfg.validate()
    store = open_store(cfg.validation_files, cfg, tokenizer, "data.validation_files")
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    ids = np.arange(len(store))
    for start in range(0, len(ids), 256):
        chunk = ids[start:start + 256]
        lengths = store.lengths(chunk)
        for tokens in store.read([(int(d), 0, int(n)) for d, n in zip(chunk, lengths)]):
            counts += np.bincount(tokens, minlength=tokenizer.vocab_size)[: tokenizer.vocab_size]
    counts[tokenizer.eos_id] += len(ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
