"""Document stores: random access to tokenized documents by id, the `grain` data-source contract the packer reads.

`TextDocumentStore` tokenizes lazily (a document is encoded the first time a batch needs it; lengths are kept, tokens
sit in an LRU), so a run on raw jsonl starts in about the time it takes to parse the JSON. `PreparedDocumentStore`
(prepared.py) serves the same interface from token shards written offline.
"""

from __future__ import annotations

import collections
from typing import Protocol, Sequence

import numpy as np

from litespark_jax.data.locking import PicklableLock
from litespark_jax.data.sources import TextCorpus
from litespark_jax.data.tokenizers import Tokenizer, encode_array


class DocumentStore(Protocol):
    """Tokenized documents addressed by id 0..len-1 (ids follow sorted-file, then line, order)."""

    set_names: list[str]
    set_index: np.ndarray

    def __len__(self) -> int: ...

    def lengths(self, doc_ids: np.ndarray) -> np.ndarray:
        """Token counts (without BOS/EOS) of the given documents."""

    def read(self, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """For each (doc_id, lo, hi): tokens[lo:hi] of that document, int32."""


class TextDocumentStore(PicklableLock):
    """Documents parsed from jsonl shards and tokenized on first use."""

    def __init__(self, corpus: TextCorpus, tokenizer: Tokenizer, cache_docs: int = 4096):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.set_names = corpus.set_names
        self.set_index = corpus.set_index
        self._lengths = np.full(len(corpus.texts), -1, dtype=np.int64)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_docs = cache_docs
        PicklableLock.__init__(self)
        self._dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32  # halves the cache for most vocabs

    def __len__(self) -> int:
        return len(self.corpus.texts)

    def __getitem__(self, doc_id: int) -> np.ndarray:
        return self.tokens(doc_id)

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = collections.OrderedDict()
        return state

    def tokens(self, doc_id: int) -> np.ndarray:
        doc_id = int(doc_id)
        with self._lock:
            cached = self._cache.get(doc_id)
            if cached is not None:
                self._cache.move_to_end(doc_id)
                return cached
        ids = encode_array(self.tokenizer, self.corpus.texts[doc_id]).astype(self._dtype)
        with self._lock:
            self._lengths[doc_id] = len(ids)
            self._cache[doc_id] = ids
            while len(self._cache) > self._cache_docs:
                self._cache.popitem(last=False)
        return ids

    def lengths(self, doc_ids: np.ndarray) -> np.ndarray:
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        missing = [int(d) for d in dict.fromkeys(doc_ids[self._lengths[doc_ids] < 0].tolist())]
        for doc_id in missing:
            self.tokens(doc_id)
        return self._lengths[doc_ids]

    @property
    def tokenizes_slowly(self) -> bool:
        """True when building rows in parallel threads pays off (a real tokenizer; byte encoding is a memcpy)."""
        return self.tokenizer.name != "byte"

    def read(self, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        return [self.tokens(doc_id)[lo:hi] for doc_id, lo, hi in requests]
