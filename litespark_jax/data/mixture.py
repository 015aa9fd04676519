"""The global document order: slot i of the (infinite) document stream -> document id, as a pure function of the seed.

Each `redpajama_set_name` is its own stream of epochs, each epoch a fresh permutation seeded by (seed, set, epoch);
with a mixture, every slot draws its set with the given weights (seeded per block of slots), so slot -> document is
still O(1) and vectorised. This is grain's shuffle -> repeat -> mix, written with numpy because grain's per-element
`MapDataset.mix` costs ~2 ms per element here (measured), which would dominate the pipeline.
"""

from __future__ import annotations

import collections

import numpy as np

from litespark_jax.data.locking import PicklableLock
from litespark_jax.errors import DataError

_SHUFFLE_TAG = 0x5EED
_MIX_TAG = 0x3141
BLOCK = 1 << 16


class DocumentOrder(PicklableLock):
    """Maps global stream slots to document ids; independent of process count by construction."""

    def __init__(self, set_index: np.ndarray, set_names: list[str], *, seed: int, shuffle: bool = True,
                 mixture: dict[str, float] | None = None, key: str = "data.mixture"):
        self.seed = int(seed)
        self.shuffle = shuffle
        if mixture is None:
            self.members = [np.arange(len(set_index), dtype=np.int64)]
            self.weights = np.ones(1)
            self.names = ["*"]
        else:
            missing = sorted(name for name in mixture if name not in set_names)
            if missing:
                raise DataError(f"{key}: no documents with redpajama_set_name {', '.join(missing)} "
                                f"(the data has: {', '.join(set_names)})")
            active = [(name, float(w)) for name, w in sorted(mixture.items()) if w > 0]
            self.names = [name for name, _ in active]
            self.members = [np.flatnonzero(set_index == set_names.index(name)).astype(np.int64) for name, _ in active]
            weights = np.array([w for _, w in active])
            self.weights = weights / weights.sum()
        self._perms: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._blocks: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._counts_before = [np.zeros(len(self.members), dtype=np.int64)]
        PicklableLock.__init__(self)

    def _perm(self, set_id: int, epoch: int) -> np.ndarray:
        key = (set_id, epoch)
        perm = self._perms.get(key)
        if perm is None:
            n = len(self.members[set_id])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, _SHUFFLE_TAG, set_id, epoch]).permutation(n)
            else:
                perm = np.arange(n)
            self._perms[key] = perm
            while len(self._perms) > 2 * len(self.members) + 2:
                self._perms.popitem(last=False)
        return perm

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(set of each slot, index of the slot within its set's stream) for one block of slots."""
        cached = self._blocks.get(block)
        if cached is not None:
            return cached
        while len(self._counts_before) <= block:
            b = len(self._counts_before) - 1
            picks = self._picks(b)
            self._counts_before.append(self._counts_before[b] + np.bincount(picks, minlength=len(self.members)))
        picks = self._picks(block)
        within = np.empty(BLOCK, dtype=np.int64)
        for s in range(len(self.members)):
            mask = picks == s
            within[mask] = self._counts_before[block][s] + np.arange(int(mask.sum()))
        self._blocks[block] = (picks, within)
        while len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return picks, within

    def _picks(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _MIX_TAG, block])
        return rng.choice(len(self.members), size=BLOCK, p=self.weights)

    def doc_ids(self, slots: np.ndarray) -> np.ndarray:
        """Document id at each global slot (thread-safe: rows are built in parallel threads)."""
        with self._lock:
            return self._doc_ids(slots)

    def _doc_ids(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        if len(self.members) == 1:
            sets = np.zeros_like(slots)
            within = slots
        else:
            sets = np.empty_like(slots)
            within = np.empty_like(slots)
            blocks = slots // BLOCK
            for block in np.unique(blocks):
                mask = blocks == block
                picks, idx = self._block(int(block))
                offsets = slots[mask] % BLOCK
                sets[mask] = picks[offsets]
                within[mask] = idx[offsets]
        out = np.empty_like(slots)
        for s in np.unique(sets):
            mask = sets == s
            members = self.members[int(s)]
            n = len(members)
            epochs = within[mask] // n
            positions = within[mask] % n
            ids = np.empty(int(mask.sum()), dtype=np.int64)
            for epoch in np.unique(epochs):
                emask = epochs == epoch
                ids[emask] = members[self._perm(int(s), int(epoch))[positions[emask]]]
            out[mask] = ids
        return out
