"""Config loading: presets, overrides, and one clear sentence for every mistake."""

import glob
import os

import pytest

from litespark_jax.config import Config, describe_options, load_config
from litespark_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROPE = "factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_preset_loads_and_validates(path):
    assert isinstance(load_config(path), Config)


def test_llama_3b_preset_has_the_benchmark_shape():
    m = load_config(os.path.join(ROOT, "configs", "llama-3.2-3b.yaml")).model
    assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff, m.vocab_size, m.tie_embeddings) == (
        28, 3072, 24, 8, 8192, 128256, True)
    assert 3.2e9 < m.num_params() < 3.22e9  # Llama 3.2 3B has 3.21B parameters


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["train.steps=7", "optim.learning_rate=1e-3", "model.tie_embeddings=true",
                             "model.remat_save_names=[query, key]", "model.remat_policy=names"])
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 1e-3 and cfg.model.tie_embeddings is True
    assert cfg.model.remat_save_names == ("query", "key")


@pytest.mark.parametrize("overrides, message", [
    (["model.num_haeds=8"], "unknown key 'model.num_haeds' (did you mean 'model.num_heads'?)"),
    (["modle.num_heads=8"], "unknown section 'modle' (did you mean 'model'?)"),
    (["train.steps=many"], "'train.steps' must be int, got 'many'"),
    (["model.num_heads=7"], "model.num_heads (7) must divide model.d_model (256)"),
    (["model.num_kv_heads=3"], "model.num_kv_heads (3) must divide model.num_heads (8)"),
    (["train.seq_len=4096"], "train.seq_len (4096) is longer than model.max_seq_len (2048)"),
    (["train.steps=0"], "train.steps must be positive, got 0"),
    (["model.remat_policy=fulll"], "model.remat_policy must be one of"),
    (["model.remat_policy=names", "model.remat_save_names=[query, mlp_gateup]"],
     "model.remat_save_names: unknown activation 'mlp_gateup'"),
    (["train.global_batch_size=6", "train.grad_accum_steps=4"], "must be divisible by train.grad_accum_steps"),
    (["model.dtype=bf16"], "model.dtype must be one of float32, bfloat16, float16, got 'bf16'"),
    (["steps=3"], "must be section.key"),
    (["train.steps"], "must look like section.key=value"),
    (["mesh.fsdp=-1", "mesh.data=-1"], "at most one mesh axis may be -1"),
    (["model.mlp_impl=mosaic"], "model.mlp_impl must be one of auto, fused, "),
    (["model.cross_entropy_impl=single-pass"], "got 'single-pass' (did you mean 'single_pass'?)"),
    (["model.attention_impl=flash"], "model.attention_impl must be one of auto, cudnn, pallas, reference"),
    (["model.attention_impl=cudnn"], "model.attention_impl=cudnn: the model's dtype must be bfloat16 or float16, not float32"),
    (["model.attention_impl=cudnn", "model.dtype=bfloat16", "model.head_dim=36"],
     "model.attention_impl=cudnn: the model's head_dim must be a multiple of 8 up to 256, not 36"),
    (["model.attention_impl=cudnn", "model.dtype=bfloat16", "train.seq_len=255"],
     "model.attention_impl=cudnn: the model's train.seq_len must be even (cuDNN's backward refuses odd lengths), "
     "not 255"),
    (["model.attention_impl=pallas", "model.dtype=bfloat16", "model.head_dim=96"],
     "model.attention_impl=pallas needs head_dim 64 or 128 and dtype bfloat16 or float16, the model has head_dim 96"),
    (["model.attention_impl=pallas"], "and dtype float32; attention_impl=auto picks an attention that takes it"),
    (["train.eval_every=-5"], "train.eval_every must not be negative (0: only at the end), got -5"),
    (["optim.b1=1.5"], "optim.b1 and optim.b2 must be within [0, 1) and optim.eps positive, got 1.5, 0.95"),
    (["optim.b2=-1"], "optim.b1 and optim.b2 must be within [0, 1)"),
    (["train.z_loss_weight=-1"], "train.z_loss_weight must not be negative, got -1"),
    (["train.peak_tflops_per_device=-5"], "train.peak_tflops_per_device must be positive or null (detect), got -5"),
    (["model.rope_theta=-1"], "model.rope_theta and model.norm_eps must be positive, got -1"),
    (["model.norm_eps=0"], "model.rope_theta and model.norm_eps must be positive"),
    (["train.xla_options={xla_gpu_enable_latency_hiding_scheduler:true}"],
     "'xla_gpu_enable_latency_hiding_scheduler:true' has no value (write 'name: value', with a space after"),
    (["train.xla_options={xla_gpu_autotune_level: [4]}"], "'xla_gpu_autotune_level' must be a string, bool or number"),
    (["train.seed=-1"], "train.seed must be within [0, 2**32 - 1], got -1"),
    (["train.seed=4294967296"], "train.seed must be within [0, 2**32 - 1], got 4294967296"),
    (["optim.decay_steps=0"], "optim.decay_steps must be positive or null (until train.steps), got 0"),
    (["model.head_dim=-2"], "model.head_dim must be positive or null (d_model // num_heads), got -2"),
    (["model.head_dim=0"], "model.head_dim must be positive or null (d_model // num_heads), got 0"),
    ([f"model.rope_scaling={{{ROPE}, factor: x}}"], "model.rope_scaling.factor must be a positive number, got 'x'"),
    ([f"model.rope_scaling={{{ROPE}, factor: .nan}}"], "model.rope_scaling.factor must be a positive number, got nan"),
    ([f"model.rope_scaling={{{ROPE}, low_freq_factor: 0}}"], "model.rope_scaling.low_freq_factor must be a positive"),
    ([f"model.rope_scaling={{{ROPE}, original_max_position_embeddings: true}}"],
     "model.rope_scaling.original_max_position_embeddings must be a positive number, got True"),
    ([f"model.rope_scaling={{{ROPE}, high_freq_factor: 1}}"],
     "model.rope_scaling.high_freq_factor must differ from low_freq_factor (both are 1"),
    (["model.rope_scaling={factor: 8}"], "model.rope_scaling is missing high_freq_factor, low_freq_factor, original_"),
    (["optim.learning_rate=nan"], "optim.learning_rate must be a finite number, got nan"),
    (["optim.learning_rate=-1"], "optim.learning_rate must be positive, got -1.0"),
    (["optim.grad_clip=-0.5"], "optim.grad_clip must not be negative, got -0.5"),
    (["optim.b2=.inf"], "optim.b2 must be a finite number, got inf"),
    (["model.rope_theta=-inf"], "model.rope_theta must be a finite number, got -inf"),
    (["posttrain.beta=.nan"], "posttrain.beta must be a finite number, got nan"),
])
def test_bad_values_raise_one_clear_sentence(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  d_model: wide\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: 'model.d_model' must be int, got 'wide'"):
        load_config(str(wrong))


def test_help_lists_every_option_with_its_default():
    text = describe_options()
    assert "model.num_heads=8" in text and "train.steps=1000" in text and "optim.b2=0.95" in text
    assert "Key/value heads" in text  # the field docstring travels into --help


def test_edge_values_that_are_valid_still_load():
    cfg = load_config(None, ["train.seed=4294967295", "optim.decay_steps=1", "model.head_dim=16",
                             f"model.rope_scaling={{{ROPE}}}"])
    assert cfg.train.seed == 2**32 - 1 and cfg.optim.decay_steps == 1 and cfg.model.resolved_head_dim == 16


def test_an_override_onto_a_section_that_is_not_a_mapping_names_it(tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text("train: 5\n")
    for overrides in ([], ["train.steps=2"]):
        with pytest.raises(ConfigError, match=r"scalar.yaml: section 'train' must be a mapping, got int$"):
            load_config(str(path), overrides)


def test_unreadable_config_files_name_the_file(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text: byte 5 \(0xe9\) cannot be decoded"):
        load_config(str(latin1))
    with pytest.raises(ConfigError, match=r"config file '.*' cannot be read: Is a directory"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("text, message", [
    ("model:\n  4: num_layers\n", "keys.yaml: section 'model' has key 4 (int), not a field name"),
    ("model:\n  yes: 1\n", "keys.yaml: section 'model' has key True (bool), not a field name"),
    ("yes:\n  steps: 1\n", "keys.yaml: top-level key True (bool) is not a section name"),
])
def test_keys_that_yaml_reads_as_numbers_or_bools_are_named(tmp_path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_default_in_help_can_be_typed_back_as_shown():
    """--help shows each default as one types it (null, true, a bare word); typed back, it is the default."""
    overrides = [line.strip().split("  ", 1)[0] for line in describe_options().splitlines() if line.startswith("  ")]
    assert len(overrides) > 50 and "model.head_dim=null" in overrides and "train.resume_data=true" in overrides
    assert load_config(None, overrides).to_dict() == Config().to_dict()
