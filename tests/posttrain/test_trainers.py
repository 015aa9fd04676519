"""Starting weights (a Hugging Face directory, our checkpoint), the CLIs' one-line errors, an SFT run end to end."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from litespark_jax.errors import ConfigError, DataError
from litespark_jax.posttrain.trainer import SFTTrainer
from tests.posttrain.conftest import tiny_config

GOOD = {"prompt": "q", "completion": "a"}


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_hugging_face_directory(tmp_path, jsonl):
    from safetensors.numpy import save_file

    from litespark_jax import hf
    from litespark_jax.train.state import init_model

    cfg = tiny_config(32, posttrain={"train_file": jsonl([GOOD])})
    _, params = init_model(cfg.model, seed=7)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(hf.to_hf_state_dict(nnx.to_pure_dict(params), cfg.model), str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(hf.hf_config(cfg.model)))

    import dataclasses

    cfg = dataclasses.replace(cfg, posttrain=dataclasses.replace(cfg.posttrain, init_from=str(hf_dir)))
    trainer = SFTTrainer(cfg)
    _leaves_equal(trainer.initial_params(), params)
    state = trainer.init_state()
    assert int(state.step) == 0
    _leaves_equal(state.params, params)

    wrong = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=96))
    with pytest.raises(ConfigError, match="d_ff"):
        SFTTrainer(wrong).initial_params()
    # The norm's epsilon is part of the function too: a model section that differs would silently use its own.
    other_eps = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm_eps=1e-6))
    with pytest.raises(ConfigError, match=r"gives norm_eps=1e-05 but model\.norm_eps is 1e-06"):
        SFTTrainer(other_eps).initial_params()


def _live_bytes() -> int:
    import gc

    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_the_state_does_not_keep_a_second_copy_of_the_weights_unless_dpo_needs_it(kind, jsonl):
    """SFT's state took a copy of the starting weights and the trainer held the originals for the whole run: a
    second float32 model on the device (the 3B SFT preset ran out of memory on an H100). DPO keeps them: they are
    its reference (until the precomputing pass, or every step)."""
    from litespark_jax.posttrain.trainer import DPOTrainer

    pair = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    cfg = tiny_config(32, model={"d_model": 64, "d_ff": 128},
                      posttrain={"train_file": jsonl([GOOD] if kind == "sft" else [pair])})
    trainer = (SFTTrainer if kind == "sft" else DPOTrainer)(cfg)
    before = _live_bytes()
    state = trainer.init_state()
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    params_bytes = sum(a.nbytes for a in jax.tree.leaves(state.params))
    extra = params_bytes if kind == "dpo" else 0
    assert _live_bytes() - before == state_bytes + extra
    _leaves_equal(trainer.initial_params(), state.params)  # reloaded (SFT) or kept (DPO): the same weights

    # Weights someone was handed by initial_params() stay usable: the state copies them instead.
    handed_out = trainer.initial_params()
    trainer.init_state()
    assert np.isfinite(trainer.evaluate(handed_out)) if kind == "sft" else handed_out is trainer.initial_params()


def test_the_dpo_cli_run_frees_the_reference_weights_once_precomputed(tmp_path, jsonl, monkeypatch):
    """``python -m litespark_jax.dpo`` evaluated the starting weights before training and kept a reference to them
    for the whole run: a second float32 model on the device. During training only the state is live (float32
    weights and two float32 Adam moments)."""
    import litespark_jax.train.loop as loop
    from litespark_jax.posttrain.run import run

    pair = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    cfg = tiny_config(32, model={"d_model": 128, "d_ff": 256}, train={"steps": 1, "run_dir": str(tmp_path / "dpo")},
                      checkpoint={"every": 0}, posttrain={"train_file": jsonl([pair] * 8)})
    live = []
    train = loop.train
    monkeypatch.setattr(loop, "train", lambda config, trainer=None, callback=None: train(
        config, trainer=trainer, callback=lambda step, metrics: live.append(_live_bytes())))
    run("dpo", cfg)
    params_bytes = 4 * cfg.model.num_params()
    assert len(live) == 1 and 3 * params_bytes <= live[0] < 3.5 * params_bytes, (live, params_bytes)


@pytest.mark.slow
def test_sft_run_then_init_from_its_checkpoint(tmp_path):
    from litespark_jax.train.loop import train

    cfg = tiny_config(256, train={"steps": 3, "run_dir": str(tmp_path / "sft")}, checkpoint={"every": 0},
                      posttrain={"pack": True})  # the bundled SFT examples
    trainer = SFTTrainer(cfg)
    assert trainer.stats.kept > 400 and trainer.stats.truncated > 0
    result = train(cfg, trainer=trainer)
    assert len(result.history) == 3 and np.isfinite(result.history[-1]["loss"])
    assert result.history[-1]["tokens"] > 0 and "tokens_per_second" in result.history[-1]
    assert result.eval_history and np.isfinite(result.eval_history[-1]["eval_loss"])

    import dataclasses

    follow = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, run_dir=str(tmp_path / "next")),
        posttrain=dataclasses.replace(cfg.posttrain, init_from=str(tmp_path / "sft" / "checkpoints")))
    _leaves_equal(SFTTrainer(follow).initial_params(), result.state.params)

    # Only the parameters are read: another optimizer (no clipping: no clip state in the optimizer's tree) starts
    # from them too, where restoring the whole TrainState refused the checkpoint's optimizer arrays.
    other_optimizer = dataclasses.replace(follow, optim=dataclasses.replace(follow.optim, grad_clip=0.0))
    _leaves_equal(SFTTrainer(other_optimizer).initial_params(), result.state.params)

    # A checkpoint of another shape, or none at all, is refused when the trainer is built (the field named, from the
    # checkpoint's saved config), not after the data is tokenized; the run directory is not made.
    from litespark_jax.errors import CheckpointError

    wider = dataclasses.replace(follow, model=dataclasses.replace(follow.model, d_ff=2 * follow.model.d_ff))
    with pytest.raises(ConfigError, match=r"posttrain.init_from: the saved config of .*/sft/checkpoints/3 gives "
                                          r"d_ff=\d+ but model.d_ff is \d+; make the model section match"):
        SFTTrainer(wider)
    gone = dataclasses.replace(follow, posttrain=dataclasses.replace(follow.posttrain, init_from=str(tmp_path / "x")))
    with pytest.raises(CheckpointError, match=r"posttrain.init_from: .*/x does not exist"):
        SFTTrainer(gone)
    assert not (tmp_path / "next").exists()
    # A run resuming from its own checkpoints does not read init_from, so it is not checked.
    resuming = dataclasses.replace(gone, train=dataclasses.replace(gone.train, run_dir=str(tmp_path / "sft")))
    assert SFTTrainer(resuming).train_file


@pytest.mark.parametrize("module", ["sft", "dpo"])
def test_cli_bad_input_is_one_line_exit_2(module, jsonl, capsys, tmp_path):
    import importlib

    from litespark_jax.cli import run_main

    main = importlib.import_module(f"litespark_jax.{module}").main
    bad = (jsonl([GOOD, {"messages": [{"role": "user", "content": "no answer"}]}]) if module == "sft"
           else jsonl([{"prompt": "q", "chosen": "a", "rejected": ""}]))
    small = ["model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=1", "model.d_ff=64",
             "train.seq_len=32", f"train.run_dir={tmp_path}"]
    assert run_main(main, ["--config", f"configs/{module}-tiny.yaml", f"posttrain.train_file={bad}", *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad in err[0]
    assert run_main(main, ["--config", f"configs/{module}-tiny.yaml", "posttrain.loss_type=hinge"]) == 2
    assert "posttrain.loss_type must be one of sigmoid, ipo" in capsys.readouterr().err
    gone = str(tmp_path / "gone.jsonl")
    assert run_main(main, ["--config", f"configs/{module}-tiny.yaml", f"posttrain.eval_file={gone}", *small]) == 2
    assert capsys.readouterr().err.strip() == f"error: posttrain.eval_file: {gone} does not exist"


def test_run_summary_holds_energy_and_the_sm_clock(tmp_path, monkeypatch, capsys):
    """``python -m litespark_jax.sft``'s summary (file and last lines) carries the run's energy, average power, SM
    clock and power-capped share, as the bench and the training log do (a fake NVML window here)."""
    import json

    from litespark_jax.posttrain import run as run_module

    class Window:
        def __init__(self, clock_interval_s=None):
            assert clock_interval_s  # the run asks for the clock
            self.sm_clock_mhz = self.power_capped = None

        def start(self):
            pass

        def stop(self):
            self.sm_clock_mhz, self.power_capped = 1440.0, 0.75
            return 5000.0, 690.0

    monkeypatch.setattr(run_module, "EnergyWindow", Window)
    cfg = tiny_config(256, train={"steps": 1, "run_dir": str(tmp_path / "sft")}, checkpoint={"every": 0},
                      posttrain={"pack": True})
    run_module.run("sft", cfg)
    summary = json.loads((tmp_path / "sft" / "sft_summary.json").read_text())
    assert (summary["energy_joules"], summary["average_watts"]) == (5000.0, 690.0)
    assert (summary["sm_clock_mhz"], summary["power_capped"]) == (1440.0, 0.75)
    out = capsys.readouterr().out
    assert "energy 5000 J (690 W average, SM clock 1440 MHz, power-capped in 75% of samples)" in out
    assert "eval loss at step 1: " in out and "(not read" not in out
    # Run again with no step left to take: the summary of the run that trained is kept (it became all nulls).
    run_module.run("sft", cfg)
    assert json.loads((tmp_path / "sft" / "sft_summary.json").read_text()) == summary
    out = capsys.readouterr().out
    assert "nothing to train" in out
    assert "starting weights random init (not read: the run resumes from a checkpoint)" in out


def test_paths_take_a_leading_tilde_and_a_glob_is_named(tmp_path, monkeypatch, jsonl):
    from litespark_jax.posttrain.trainer import data_files

    monkeypatch.setenv("HOME", str(tmp_path))
    train = jsonl([GOOD])
    cfg = tiny_config(64, posttrain={"train_file": "~/" + os.path.basename(train), "init_from": "~/ckpt"})
    assert (cfg.posttrain.train_file, cfg.posttrain.init_from) == (train, str(tmp_path / "ckpt"))
    assert data_files(cfg, "sft") == (train, None)
    with pytest.raises(DataError, match=r"posttrain.train_file: .*/\*.jsonl looks like a glob; it takes one JSONL"):
        data_files(tiny_config(64, posttrain={"train_file": str(tmp_path / "*.jsonl")}), "sft")
    with pytest.raises(ConfigError, match=r"label_smoothing \(0.2\) applies to the sigmoid loss only"):
        tiny_config(64, posttrain={"loss_type": "ipo", "label_smoothing": 0.2}).posttrain.validate()
