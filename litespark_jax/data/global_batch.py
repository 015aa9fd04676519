"""Process-local batches -> global jax.Arrays: each process builds and hands over only the rows its devices hold."""

from __future__ import annotations

import jax
import numpy as np

from litespark_jax.errors import ConfigError


def process_row_shard(sharding: jax.sharding.Sharding, global_rows: int) -> tuple[int, int]:
    """(index, count) of the block of global-batch rows this process's devices hold, the batch cut into ``count``
    equal blocks. One block per process when only data/fsdp cross processes; when tensor or context parallelism
    spans processes, processes that hold the same rows get the same block and build the same rows (numbering blocks
    by process index instead gave each of them other rows, and JAX assembled a batch of half the size)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_rows, 1)).values():
        rows.update(range(*index[0].indices(global_rows)))
    lo, size = min(rows), len(rows)
    if max(rows) + 1 - lo != size or global_rows % size or lo % size:
        raise ConfigError(f"this process's devices hold rows {sorted(rows)} of the {global_rows}-row batch, not one "
                          "contiguous block of an even split: place mesh.data/fsdp across the nodes "
                          "(mesh.inter_node_*)")
    return lo // size, global_rows // size


def to_global_arrays(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                     global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch of ``global_rows`` rows from this process's block (``process_row_shard``)
    without any host reading others' rows."""
    return {key: jax.make_array_from_process_local_data(sharding, value, (global_rows, *value.shape[1:]))
            for key, value in local_batch.items()}


def process_local_rows(array: jax.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a global array, read from this process's own shards (in a multi-process run the whole
    array is not addressable here, so ``np.asarray`` of it raises)."""
    out = np.empty((stop - start, *array.shape[1:]), array.dtype)
    for shard in array.addressable_shards:
        first, end, _ = shard.index[0].indices(array.shape[0])
        lo, hi = max(first, start), min(end, stop)
        if lo < hi:
            out[(slice(lo - start, hi - start), *shard.index[1:])] = np.asarray(shard.data)[lo - first:hi - first]
    return out
