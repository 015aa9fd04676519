"""Post-training runs resume like pretraining: a run stopped at step 2 and resumed equals one run of 4 steps."""

import dataclasses

import numpy as np
import pytest

from tests.posttrain.conftest import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    from litespark_jax.posttrain.trainer import DPOTrainer, SFTTrainer
    from litespark_jax.train.loop import train

    cls = SFTTrainer if kind == "sft" else DPOTrainer
    base = tiny_config(128 if kind == "sft" else 64, train={"steps": 4, "global_batch_size": 4},
                       checkpoint={"every": 2, "async_save": False})

    class Stop(Exception):
        pass

    def stop_at_3(step, metrics):
        if step == 3:  # the step-2 checkpoint is written; the schedule (train.steps) is the same as straight's
            raise Stop

    def run(name, callback=None):
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, run_dir=str(tmp_path / name)))
        return train(cfg, trainer=cls(cfg), callback=callback).history

    straight = run("straight")
    with pytest.raises(Stop):
        run("resumed", stop_at_3)
    resumed = run("resumed")  # train.resume=auto finds step 2 in resumed/checkpoints
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_a_data_position_from_another_pipeline_is_a_clear_error(tmp_path, capsys):
    from litespark_jax.errors import CheckpointError
    from litespark_jax.posttrain.trainer import SFTTrainer
    from litespark_jax.train.loop import train

    def run(steps, pack, **train_fields):
        cfg = tiny_config(128, train={"steps": steps, "global_batch_size": 4, "run_dir": str(tmp_path / "run"),
                                      **train_fields},
                          checkpoint={"every": 2, "async_save": False}, posttrain={"pack": pack})
        return train(cfg, trainer=SFTTrainer(cfg)).history

    run(2, pack=True)
    # Unpacked batches keep another iterator state than packed ones: grain raised KeyError('next_index').
    with pytest.raises(CheckpointError, match=r"the data position in .*/checkpoints/2 does not fit this run's data "
                                              r"pipeline .*posttrain.init_from.*train.resume_data=false"):
        run(3, pack=False)
    assert "resumed from" not in capsys.readouterr().out  # it did not resume
    assert [h["step"] for h in run(3, pack=False, resume_data=False)] == [3]
    out = capsys.readouterr().out
    assert out.index("resumed from") < out.index("train.resume_data=false: the data stream starts afresh")
