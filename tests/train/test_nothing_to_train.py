"""Resuming a run whose checkpoint is already at (or past) train.steps says so, instead of a summary of NaNs."""

from litespark_jax.config import load_config
from litespark_jax.train.report import train_and_report

SMALL = ["model.num_layers=1", "train.seq_len=32", "train.global_batch_size=2", "train.eval_every=2",
         "train.eval_batches=1", "log.progress_bar=false", "log.tensorboard=false", "checkpoint.every=2",
         "checkpoint.async_save=false", "train.resume=auto"]


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    config = lambda steps: load_config("configs/tiny.yaml", [*SMALL, f"train.steps={steps}",  # noqa: E731
                                                             f"train.run_dir={tmp_path}"])
    first = train_and_report(config(2))
    out = capsys.readouterr().out
    assert first.history and "final train loss" in out and "validation loss" in out

    again = train_and_report(config(1))  # the checkpoint is at step 2
    out = capsys.readouterr().out
    assert not again.history and int(again.state.step) == 2
    assert "nothing to train: the run's checkpoint is at step 2 and train.steps is 1" in out
    assert "nan" not in out
    # config.yaml still names the config that made the checkpoint
    assert "steps: 2" in (tmp_path / "config.yaml").read_text() and not list(tmp_path.glob("config.*.yaml"))
