"""The data position a checkpoint keeps when the processes' positions differ.

Only process 0 writes a checkpoint's JSON items, so every process used to resume from process 0's data position.
That is right when the positions agree (pretraining and DPO count batches the same way on every process), but SFT's
packing consumes a different number of examples on each block of rows, and the other blocks resumed reading from
the wrong examples. When the positions differ, all of them are saved, one per block of rows
(``Trainer.row_shard``), and each process restores its own.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from litespark_jax.errors import CheckpointError
from litespark_jax.parallel.distributed import per_process

PER_ROW_BLOCK = "per_row_block"


def gather(position: dict | None, row_block: int) -> dict | None:
    """What to save: ``position`` itself when every process holds the same one, else ``{"per_row_block": [...]}``.
    A collective: every process calls it at the same save."""
    if position is None or jax.process_count() == 1:
        return position
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps([row_block, position], sort_keys=True).encode(), np.uint8)
    lengths = per_process(encoded.size)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded))
    by_block = dict(json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths))
    if all(saved == by_block[row_block] for saved in by_block.values()):
        return position
    return {PER_ROW_BLOCK: [by_block[block] for block in range(len(by_block))]}


def own(saved: dict, row_block: int, row_blocks: int, source: str | None) -> dict:
    """This process's position out of what ``gather`` saved."""
    if not (isinstance(saved, dict) and PER_ROW_BLOCK in saved):
        return saved
    positions = saved[PER_ROW_BLOCK]
    if len(positions) != row_blocks:
        raise CheckpointError(
            f"the data position in {source} was saved by {len(positions)} blocks of rows (processes that read their "
            f"own examples), and this run has {row_blocks}: each block's position only fits its own examples. "
            f"Resume on the same number of processes, or keep the state and start the data afresh with "
            f"train.resume_data=false")
    return positions[row_block]
