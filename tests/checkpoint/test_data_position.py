"""Which saved data position a process resumes from (the multi-process save is in tests/parallel)."""

import pytest

from litespark_jax.checkpoint import data_position
from litespark_jax.errors import CheckpointError


def test_one_process_saves_its_position_as_it_is():
    position = {"parent": {"next_index": 16}, "next_row": 0}
    assert data_position.gather(position, row_block=0) is position
    assert data_position.own(position, 0, 1, "ckpt/4") is position


def test_each_block_of_rows_resumes_from_its_own_position():
    saved = {"per_row_block": [{"next_index": 16}, {"next_index": 192}]}
    assert data_position.own(saved, 0, 2, "ckpt/4") == {"next_index": 16}
    assert data_position.own(saved, 1, 2, "ckpt/4") == {"next_index": 192}


def test_positions_of_another_number_of_blocks_are_refused_by_name():
    saved = {"per_row_block": [{"next_index": 16}, {"next_index": 192}]}
    with pytest.raises(CheckpointError, match=r"ckpt/4 was saved by 2 blocks of rows .* this run has 1: .*"
                                              r"train.resume_data=false"):
        data_position.own(saved, 0, 1, "ckpt/4")
