"""Hugging Face import/export: bit-exact round trip, transformers logits parity on the exported directory, one
imported training step equal to the same step in transformers, and one-line errors for bad HF directories."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litespark_jax.checkpoint.manager import CheckpointManager
from litespark_jax.config import CheckpointConfig, Config, ModelConfig, OptimConfig, TrainConfig
from litespark_jax.convert import export_hf, import_hf, load_hf_params, main, parse_size
from litespark_jax.errors import CheckpointError
from litespark_jax.model import Llama
from litespark_jax.train.optimizer import build_optimizer
from litespark_jax.train.state import TrainState, init_model
from litespark_jax.train.step import make_train_step

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, d_ff=96, max_seq_len=64)
MODELS = {
    "llama2-untied": ModelConfig(**SMALL, num_kv_heads=4, tie_embeddings=False),
    "llama3-tied-gqa": ModelConfig(**SMALL, num_kv_heads=2, tie_embeddings=True, rope_theta=500000.0,
                                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16}),
}


def write_checkpoint(directory, model_cfg, seed=1):
    config = Config(model=model_cfg)
    _, params = init_model(model_cfg, seed)
    optimizer = build_optimizer(config.optim, config.train.steps)
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=params, opt_state=optimizer.init(params))
    manager = CheckpointManager(str(directory), CheckpointConfig(async_save=False))
    manager.save(7, state, config=config.to_dict())
    manager.close()
    return nnx.to_pure_dict(params)


def assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact_and_transformers_logits_match(tmp_path, name):
    cfg = MODELS[name]
    ours = write_checkpoint(tmp_path / "ckpt", cfg)
    out = tmp_path / "hf"
    export_hf(str(tmp_path / "ckpt"), str(out), max_shard_size=40_000)  # small shards: exercise the index
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "byte_tokenizer.json").exists() or any("tokenizer" in n for n in os.listdir(out))

    back_cfg, back = load_hf_params(str(out))
    assert back_cfg == cfg
    assert_trees_equal(back, ours)

    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24))
    model = Llama(cfg, rngs=nnx.Rngs(params=0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, ours))
    nnx.update(model, state)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(logits - theirs).max() / np.abs(theirs).max() <= 1e-5


def save_random_hf_model(directory, cfg: ModelConfig, seed=0):
    from litespark_jax.hf import hf_config

    torch.manual_seed(seed)
    hf_cfg = hf_config(cfg)
    if cfg.rope_scaling is None:  # a Llama 2 style config.json: no head_dim, no rope_scaling keys
        hf_cfg.pop("head_dim")
        hf_cfg.pop("rope_scaling")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float()
    with torch.no_grad():  # norms away from 1 so their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory), max_shard_size="50KB")
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_trains_one_step_like_transformers(tmp_path, name):
    cfg = MODELS[name]
    hf_model = save_random_hf_model(tmp_path / "hf", cfg)
    base = Config(optim=OptimConfig(grad_clip=0.0, warmup_steps=0), train=TrainConfig(steps=10, seq_len=16))
    config, params = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), config=base)
    assert config.model == cfg
    assert os.listdir(tmp_path / "ckpt") == ["0"]

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, size=(4, 17))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
             "segment_ids": np.ones((4, 16), np.int32), "loss_mask": np.ones((4, 16), np.float32)}
    graphdef, state = init_model(config.model, 0)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    optimizer = build_optimizer(config.optim, config.train.steps)
    step = jax.jit(make_train_step(config, graphdef, optimizer))
    with jax.default_matmul_precision("highest"):
        _, metrics = step(TrainState(step=jnp.zeros((), jnp.int32), params=state, opt_state=optimizer.init(state)),
                          batch)

    hf_model.train()
    logits = hf_model(torch.from_numpy(batch["inputs"]).long()).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                             torch.from_numpy(batch["targets"]).long().reshape(-1))
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf_model.parameters() if p.grad is not None))
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm.item(), rtol=1e-4)


def test_cli_round_trip_and_resume_source(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", MODELS["llama3-tied-gqa"])
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ckpt" / "7"), "--out", str(tmp_path / "hf"),
                 "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "back"),
                 "train.seq_len=32"]) == 0
    assert "train.resume=" in capsys.readouterr().out


def test_from_hf_with_a_config_whose_model_differs_names_the_field(tmp_path):
    """The config given to from-hf is the one training goes on with: a model section of another shape would only
    fail at that resume, after the import wrote a checkpoint."""
    from litespark_jax.errors import ConfigError

    write_checkpoint(tmp_path / "ckpt", MODELS["llama3-tied-gqa"])
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ckpt" / "7"), "--out", str(tmp_path / "hf")]) == 0
    with pytest.raises(ConfigError, match=r"--config configs/tiny.yaml: .*/hf/config.json gives vocab_size=97 but "
                                          r"model.vocab_size is 512; make the model section match"):
        main(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "back"),
              "--config", "configs/tiny.yaml"])
    assert not (tmp_path / "back").exists()  # nothing written
    cfg = MODELS["llama3-tied-gqa"]
    matching = [f"model.{k}={v}" for k, v in (("vocab_size", cfg.vocab_size), ("d_model", cfg.d_model),
                                                ("num_layers", cfg.num_layers), ("num_heads", cfg.num_heads),
                                                ("num_kv_heads", cfg.num_kv_heads), ("d_ff", cfg.d_ff),
                                                ("rope_theta", cfg.rope_theta), ("max_seq_len", cfg.max_seq_len),
                                                ("tie_embeddings", "true"))]
    matching.append("model.rope_scaling=" + json.dumps(cfg.rope_scaling))
    assert main(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "back"),
                 "--config", "configs/tiny.yaml", "train.seq_len=32", *matching]) == 0


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("5G", 5 * 10**9), ("5gb", 5 * 10**9),
                                        ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6), ("500M", 500 * 10**6),
                                        ("1.5 MiB", 3 * 2**19), ("40K", 40_000), ("1024", 1024), ("1024B", 1024)])
def test_shard_sizes_count_as_save_pretrained_does(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5X", "GB", "-5GB", "5 GB B", "0", "0MB", "0.1B", "5Gi"])
def test_bad_shard_size_is_argparses_error_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["to-hf", "--checkpoint", "ckpt", "--out", "hf", f"--max-shard-size={text}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --max-shard-size: {text!r}" in err and "Traceback" not in err


def test_cli_max_shard_size_takes_a_unit(tmp_path):
    write_checkpoint(tmp_path / "ckpt", MODELS["llama3-tied-gqa"])
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                 "--max-shard-size", "40K"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_bad_hf_directories_give_one_line_errors(tmp_path):
    from litespark_jax.cli import run_main

    save_random_hf_model(tmp_path / "hf", MODELS["llama2-untied"])
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "hf" / shard)
    with pytest.raises(CheckpointError, match=f"shard {shard} listed in model.safetensors.index.json is missing"):
        load_hf_params(str(tmp_path / "hf"))

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(
        json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="unsupported architecture.*MistralForCausalLM"):
        load_hf_params(str(tmp_path / "mistral"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory"):
        load_hf_params(str(tmp_path / "empty"))
    assert run_main(main, ["from-hf", "--hf-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert run_main(main, ["to-hf", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 2


def add_tensors(directory, tensors):
    """Add ``tensors`` to a sharded HF directory as one more shard listed in its index."""
    from safetensors.numpy import save_file

    save_file(tensors, str(directory / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: "extra.safetensors" for name in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_tensors_config_json_does_not_use_are_an_error(tmp_path):
    import dataclasses

    cfg = MODELS["llama2-untied"]
    save_random_hf_model(tmp_path / "hf", dataclasses.replace(cfg, num_layers=3))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"9 tensor\(s\) are not part of the 2-layer Llama config.json describes: "
                                              r"model\.layers\.2\.input_layernorm\.weight, .* and 6 more"):
        load_hf_params(str(tmp_path / "hf"))


def test_harmless_extra_tensors_are_ignored_and_a_differing_tied_lm_head_is_not(tmp_path):
    cfg = MODELS["llama3-tied-gqa"]
    save_random_hf_model(tmp_path / "hf", cfg)
    embed = load_hf_params(str(tmp_path / "hf"))[1]["embed"]
    inv_freq = np.ones(cfg.resolved_head_dim // 2, np.float32)
    add_tensors(tmp_path / "hf", {"model.rotary_emb.inv_freq": inv_freq,
                                  "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq,
                                  "lm_head.weight": np.array(embed)})
    assert load_hf_params(str(tmp_path / "hf"))[0] == cfg

    add_tensors(tmp_path / "hf", {"lm_head.weight": np.array(embed) + 1})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) are not part of .*: lm_head\.weight$"):
        load_hf_params(str(tmp_path / "hf"))


def test_export_writes_special_token_ids_and_replaces_old_tokenizer_files(tmp_path):
    import dataclasses

    from litespark_jax.cli import run_main
    from litespark_jax.data.tokenizers import ByteTokenizer, load_tokenizer

    write_checkpoint(tmp_path / "ckpt", dataclasses.replace(MODELS["llama2-untied"], vocab_size=260))
    out = tmp_path / "hf"
    out.mkdir()
    stale = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json"]
    for name in stale:
        (out / name).write_text("{}")
    export_hf(str(tmp_path / "ckpt"), str(out))
    assert sorted(os.listdir(out)) == ["byte_tokenizer.json", "config.json", "generation_config.json",
                                       "model.safetensors"]
    assert isinstance(load_tokenizer(str(out)), ByteTokenizer)
    ids = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    assert {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k in ids} == ids
    assert json.loads((out / "generation_config.json").read_text()) == ids
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert (hf_model.config.eos_token_id, generation.bos_token_id, generation.eos_token_id) == (257, 256, 257)

    (out / "tokenizer.json").write_text("{}")
    assert run_main(main, ["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--no-tokenizer"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


HF_CONFIG_ERRORS = [
    ([4], "expected a JSON object, got a JSON array"),
    ({"vocab_size": None}, "vocab_size must be a positive integer, got None"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers must be a positive integer, got '4'"),
    ({"num_attention_heads": True}, "num_attention_heads must be a positive integer, got True"),
    ({"intermediate_size": 0}, "intermediate_size must be a positive integer, got 0"),
    ({"num_key_value_heads": 2.0}, "num_key_value_heads must be a positive integer, got 2.0"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number, got '1e-5'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object or null, got a JSON string"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8}},
     "llama3 rope_scaling is missing low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 16}}, "rope_scaling.factor must be a positive number"),
]


@pytest.mark.parametrize("change, message", HF_CONFIG_ERRORS, ids=[m.split(" ")[0] for _, m in HF_CONFIG_ERRORS])
def test_malformed_hf_config_json_gives_one_line_errors(tmp_path, capsys, change, message):
    from litespark_jax.cli import run_main
    from litespark_jax.hf import hf_config

    config = change if isinstance(change, list) else {**hf_config(MODELS["llama2-untied"]), **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_hf_params(str(tmp_path / "hf"))
    assert str(error.value).startswith(f"{tmp_path / 'hf' / 'config.json'}: {message}")
    assert run_main(main, ["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
