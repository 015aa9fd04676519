"""Post-training runs resume like pretraining: a run stopped at step 2 and resumed equals one run of 4 steps."""

import dataclasses
import re

import numpy as np
import pytest

from tests.posttrain.conftest import tiny_config, write_jsonl


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


def test_resuming_on_other_data_or_batches_is_refused_naming_the_setting(tmp_path, capsys):
    """A post-training position used to be grain's bare index: a resume with another train file, seed or batch went on
    from that index into other batches without a word."""
    from litespark_jax.errors import DataError
    from litespark_jax.posttrain.trainer import SFTTrainer
    from litespark_jax.train.loop import train

    def run(steps, posttrain=(), **train_fields):
        cfg = tiny_config(128, train={"steps": steps, "global_batch_size": 4, "run_dir": str(tmp_path / "run"),
                                      **train_fields},
                          checkpoint={"every": 2, "async_save": False}, posttrain=dict(posttrain))
        return train(cfg, trainer=SFTTrainer(cfg)).history

    run(2)
    bundled = SFTTrainer(tiny_config(128)).train_file
    with open(bundled) as f:
        reordered = write_jsonl(tmp_path / "reordered.jsonl", f.read().splitlines()[::-1])
    for changed, setting in [({"seed": 1}, "train.seed = 0 but this run has 1"),
                             ({"global_batch_size": 8}, "train.global_batch_size = 4 but this run has 8"),
                             ({"posttrain": {"train_file": reordered}}, "the examples (posttrain.train_file"),
                             ({"posttrain": {"template": "chatml"}}, "the examples (posttrain.train_file"),
                             ({"posttrain": {"pack": False}}, "posttrain.pack = True but this run has False")]:
        with pytest.raises(DataError, match=re.escape(setting) + ".*train.resume_data=false"):
            run(3, **changed)
        assert "resumed from" not in capsys.readouterr().out
    assert [h["step"] for h in run(3, posttrain={"pack": False}, resume_data=False)] == [3]
    out = capsys.readouterr().out
    assert out.index("resumed from") < out.index("train.resume_data=false: the data stream starts afresh")
    assert [h["step"] for h in run(4, posttrain={"pack": False})] == [4]  # the settings of step 3's run resume


def test_a_data_position_from_another_pipeline_is_a_clear_error(tmp_path):
    """Pretraining's position (no ``position`` item) given to SFT's iterator: grain raised KeyError('next_index')."""
    from litespark_jax.errors import CheckpointError
    from litespark_jax.posttrain.trainer import SFTTrainer
    from litespark_jax.train.loop import _restore_data_position

    iterator = SFTTrainer(tiny_config(128, train={"run_dir": str(tmp_path)})).train_iterator()
    with pytest.raises(CheckpointError, match=r"the data position in RUN/checkpoints/2 does not fit this run's data "
                                              r"pipeline .*posttrain.init_from.*train.resume_data=false"):
        _restore_data_position(iterator, {"kind": "train", "step": 2, "seed": 0}, "RUN/checkpoints/2")


def test_the_dpo_position_does_not_depend_on_the_precomputed_reference(tmp_path):
    """Each process precomputes the reference log-probs of its own pairs only: they must not enter the identity."""
    from litespark_jax.posttrain.trainer import DPOTrainer, examples_digest

    trainer = DPOTrainer(tiny_config(64, train={"run_dir": str(tmp_path)}))
    before = examples_digest(trainer.pairs)
    trainer.precompute_reference()
    assert "ref_logps" in trainer.pairs[0]["chosen"] and examples_digest(trainer.pairs) == before
    trainer.pairs[0]["chosen"]["inputs"] = trainer.pairs[0]["chosen"]["inputs"][::-1].copy()
    assert examples_digest(trainer.pairs) != before
