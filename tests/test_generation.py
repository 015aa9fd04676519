"""KV-cache generation: the cache gives the same logits and greedy tokens as recomputing the full sequence."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litespark_jax import generation as g
from litespark_jax.config import ModelConfig
from litespark_jax.errors import ConfigError, UserError
from litespark_jax.model import Llama

# Large init so the untrained model's greedy choices are far from ties and vary from step to step.
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=128,
                  init_std=0.3)


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(params=0))


def test_greedy_cache_equals_recompute(model):
    prompt = [1, 2, 3, 4, 5]
    cached = g.generate(model, [prompt], g.SamplingConfig(max_new_tokens=24))[0]
    recomputed = g.generate_recompute(model, prompt, 24)
    assert cached == recomputed
    assert len(set(cached)) > 3  # a real sequence, not one token repeated


def test_greedy_cache_equals_recompute_tied_rope_scaled():
    cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=3, num_heads=4, num_kv_heads=1, d_ff=48, max_seq_len=64,
                      init_std=0.3, tie_embeddings=True, rope_theta=500.0,
                      rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16})
    model = Llama(cfg, rngs=nnx.Rngs(params=3))
    prompt = [5, 9, 2]
    assert g.generate(model, [prompt], g.SamplingConfig(max_new_tokens=16))[0] == g.generate_recompute(model, prompt, 16)


def test_batched_prompts_of_different_lengths(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [7, 8], [30]]
    batched = g.generate(model, prompts, g.SamplingConfig(max_new_tokens=12))
    assert batched == [g.generate_recompute(model, p, 12) for p in prompts]


def test_cached_logits_equal_full_forward(model):
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    full = model(tokens)
    cache = g.init_cache(CFG, 1, tokens.shape[1])
    pad = jnp.zeros((1,), jnp.int32)
    logits, cache = g.forward_with_cache(model, tokens[:, :6], cache, 0, pad)
    pieces = [logits]
    for i in range(6, tokens.shape[1]):
        logits, cache = g.forward_with_cache(model, tokens[:, i:i + 1], cache, i, pad)
        pieces.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = [[1, 2, 3]]
    greedy = g.generate(model, prompt, g.SamplingConfig(max_new_tokens=10))
    top1 = g.generate(model, prompt, g.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=7))
    tiny_p = g.generate(model, prompt, g.SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=7))
    assert top1 == greedy and tiny_p == greedy
    hot = g.SamplingConfig(max_new_tokens=10, temperature=2.0, seed=1)
    assert g.generate(model, prompt, hot) == g.generate(model, prompt, hot)
    assert g.generate(model, prompt, hot) != g.generate(model, prompt, g.SamplingConfig(max_new_tokens=10,
                                                                                         temperature=2.0, seed=2))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    k2 = np.asarray(g.sample_logits(logits, keys, temperature=1.0, top_k=2))
    assert set(k2.tolist()) == {0, 1}
    p = np.asarray(g.sample_logits(logits, keys, temperature=1.0, top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert set(p.tolist()) == {0, 1}
    full = np.asarray(g.sample_logits(logits, keys, temperature=1.0))
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert abs((full == 0).mean() - 0.5) < 0.05


def test_eos_stops_a_row(model):
    prompt = [1, 2, 3, 4, 5]
    greedy = g.generate(model, [prompt], g.SamplingConfig(max_new_tokens=24))[0]
    eos = greedy[4]
    stopped = g.generate(model, [prompt], g.SamplingConfig(max_new_tokens=24, eos_id=eos))[0]
    assert stopped == greedy[: greedy.index(eos) + 1]


def test_any_of_several_stop_ids_stops_a_row(model):
    prompt = [1, 2, 3, 4, 5]
    greedy = g.generate(model, [prompt], g.SamplingConfig(max_new_tokens=24))[0]
    first, later = greedy[3], next(t for t in greedy[6:] if t not in greedy[:4])
    for stops in ({later, first}, [first, later], (later, first)):
        stopped = g.generate(model, [prompt], g.SamplingConfig(max_new_tokens=24, eos_id=stops))[0]
        assert stopped == greedy[: greedy.index(first) + 1]


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        g.generate(model, [[1]], g.SamplingConfig(max_new_tokens=200))
    with pytest.raises(ValueError, match="top_p"):
        g.generate(model, [[1]], g.SamplingConfig(top_p=0.0))
    with pytest.raises(ValueError, match="at least one token"):
        g.generate(model, [[]], g.SamplingConfig())
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            g.generate(model, [[1]], g.SamplingConfig(temperature=bad))
    for greedy_with_sampling in (g.SamplingConfig(top_k=50), g.SamplingConfig(top_p=0.9)):
        with pytest.raises(ValueError, match="set temperature > 0"):
            g.generate(model, [[1]], greedy_with_sampling)


# ----------------------------------------------------------------------------------------------------------------
# The API and the CLI around generation (checkpoint -> text, in-memory model -> HF directory -> model)

SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=64",
         "model.init_std=0.3", "model.vocab_size=260", "train.seq_len=32", "log.tensorboard=false"]


def test_cli_generates_from_a_checkpoint_like_the_api(tmp_path, capsys):
    from litespark_jax import api, generate

    config = api.load_config(None, SMALL + [f"train.run_dir={tmp_path}"])
    model = api.build_model(config)
    step_dir = api.save_checkpoint(config, api._fresh_state(config, nnx.state(model)), str(tmp_path / "ckpt"))
    expected = api.generate_text(model, api.tokenizer(config), "def f(x):", max_new_tokens=12, stop_at_eos=False)
    assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def f(x):", "--max-new-tokens", "12",
                          "--no-stop"]) == 0
    assert capsys.readouterr().out == f"def f(x):{expected}\n"
    loaded, loaded_config = api.load_checkpoint(step_dir)
    assert loaded_config.model == config.model
    assert g.generate(loaded, [[1, 2, 3]], g.SamplingConfig(max_new_tokens=8)) == \
        g.generate(model, [[1, 2, 3]], g.SamplingConfig(max_new_tokens=8))


def test_export_in_memory_model_to_hf_and_back(tmp_path):
    from litespark_jax import api

    config = api.load_config(None, SMALL)
    model = api.build_model(config, seed=5)
    api.export_hf(model, str(tmp_path / "hf"), config)
    imported, imported_config = api.import_hf(str(tmp_path / "hf"), config)
    assert imported_config.model.num_layers == config.model.num_layers
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(imported))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A checkpoint path carries its own config: a second one would be ignored, so it is refused.
    with pytest.raises(ConfigError, match="a checkpoint path carries its own config"):
        api.export_hf(str(tmp_path / "some-checkpoint"), str(tmp_path / "hf2"), config)


@pytest.fixture
def captured(monkeypatch):
    """Replaces the decoder: records the token prompts and SamplingConfig the CLI asks for, generates nothing."""
    calls = []

    def fake(model, prompts, sampling):
        calls.append((prompts, sampling))
        return [[] for _ in prompts]

    monkeypatch.setattr(g, "generate", fake)
    return calls


def test_cli_stops_at_the_chat_end_of_turn_and_renders_chat_prompts(tmp_path, captured):
    from litespark_jax import api, generate

    # byte tokenizer: BOS 256, EOS 257; llama3 template: <|begin_of_text|> = BOS, header 259 / 260, <|eot_id|> 261
    config = api.load_config(None, SMALL + ["model.vocab_size=264", f"train.run_dir={tmp_path}"])
    api.save_checkpoint(config, api._fresh_state(config, nnx.state(api.build_model(config))), str(tmp_path / "ckpt"))
    assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "hi"]) == 0
    prompts, sampling = captured[-1]
    assert prompts == [[256, *b"hi"]] and set(sampling.stop_ids) == {257, 261}
    assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "hi", "--chat"]) == 0
    prompts, sampling = captured[-1]
    assert prompts == [[256, 259, *b"user", 260, *b"\n\nhi", 261, 259, *b"assistant", 260, *b"\n\n"]]
    assert set(sampling.stop_ids) == {257, 261}
    assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "hi", "--no-stop"]) == 0
    assert captured[-1][1].stop_ids == ()


def test_cli_chat_without_a_template_is_one_line_error(tmp_path, capsys):
    from litespark_jax import generate
    from litespark_jax.cli import run_main

    assert run_main(generate.main, ["--hf-dir", str(tmp_path), "--prompt", "hi", "--chat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chat needs a chat template") and err.count("\n") == 1


def test_cli_hf_dir_uses_the_directory_tokenizer(tmp_path, captured, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from litespark_jax import api, generate

    config = api.load_config(None, SMALL)
    hf = tmp_path / "hf"
    api.export_hf(api.build_model(config), str(hf), config, tokenizer=False)
    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    assert generate.main(["--hf-dir", str(hf), "--prompt", "hello world"]) == 0
    prompts, sampling = captured[-1]
    assert prompts == [[0, 3, 4]] and sampling.stop_ids == (1,)  # <s> hello world, stop at </s>
    assert "tokenizer: hf:tokenizer.json" in capsys.readouterr().err
    assert generate.main(["--hf-dir", str(hf), "--prompt", "hello world", "data.tokenizer=byte"]) == 0
    assert captured[-1][0] == [[256, *b"hello world"]]


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "50"], "--top-k: only used when sampling; set --temperature > 0"),
    (["--top-p", "0.9"], "--top-p: only used when sampling"),
    (["--num-samples", "2"], "--num-samples 2: only used when sampling"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    (["--temperature", "0.7", "--top-p", "0"], "--top-p 0.0: must be in (0, 1] (1.0 = off)"),
    (["--temperature", "0.7", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--temperature", "0.7", "--top-k", "-3"], "--top-k -3: must be at least 0"),
])
def test_cli_refuses_sampling_flags_it_would_ignore(tmp_path, capsys, flags, message):
    from litespark_jax import generate

    with pytest.raises(SystemExit) as e:  # before loading anything: the checkpoint does not even exist
        generate.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "x", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_api_refuses_parameters_of_another_shape_than_the_config(tmp_path):
    """A model of another shape used to go through model_from_state / evaluate / export_hf and fail later in a scan
    or a reshape, or (evaluate) return the other model's loss."""
    from litespark_jax import api

    config = api.load_config(None, SMALL)
    other = api.load_config(None, SMALL + ["model.num_layers=1"])
    small = api.build_model(other)
    for call in (lambda: api.model_from_state(config, nnx.state(small)),
                 lambda: api.model_from_state(config, nnx.to_pure_dict(nnx.state(small))),
                 lambda: api.evaluate(config, small),
                 lambda: api.export_hf(small, str(tmp_path / "hf"), config)):
        with pytest.raises(ConfigError, match=r"parameter '.*' has shape \(1, .*\) but config.model needs \(2, "):
            call()
    wider = api.load_config(None, SMALL + ["model.vocab_size=300"])
    with pytest.raises(ConfigError, match=r"'embed.*' has shape \(260, .*needs \(300, "):
        api.model_from_state(wider, nnx.state(api.build_model(config)))
    assert not os.path.exists(tmp_path / "hf")


def test_api_paths_none_and_single_strings(tmp_path):
    from litespark_jax import api
    from litespark_jax.errors import CheckpointError

    config = api.load_config(None, SMALL + [f"train.run_dir={tmp_path / 'run'}"])
    assert api.latest_checkpoint(config) is None  # nothing trained yet
    for call in (lambda: api.export_hf(api.latest_checkpoint(config), str(tmp_path / "hf")),
                 lambda: api.load_checkpoint(None)):
        with pytest.raises(ConfigError, match="checkpoint path is None; latest_checkpoint"):
            call()
    step_dir = api.save_checkpoint(config, api._fresh_state(config, nnx.state(api.build_model(config))))
    assert api.latest_checkpoint(config) == step_dir
    assert api.latest_checkpoint(str(tmp_path / "run" / "checkpoints")) == step_dir
    assert api.latest_checkpoint(step_dir) == step_dir
    with pytest.raises(CheckpointError, match="did you mean the run's .*checkpoints"):
        api.latest_checkpoint(str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="does not exist"):
        api.latest_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "file.png").write_text("")
    with pytest.raises(UserError, match="file.png: is a file, not a directory"):
        api.export_hf(step_dir, str(tmp_path / "file.png"))
    # One string where a list is expected is a list of one, not a list of characters.
    assert api.load_config(None, "train.steps=7").train.steps == 7


def test_greedy_takes_the_off_values_of_top_k_and_top_p():
    from litespark_jax import generate

    parser = generate.build_parser()
    args = parser.parse_args(["--checkpoint", "c", "--prompt", "x", "--top-k", "0", "--top-p", "1.0"])
    generate.check_sampling_flags(parser, args)  # refused before: any --top-k / --top-p with greedy decoding


def test_generate_text_of_no_prompts_says_so():
    from litespark_jax import api

    config = api.load_config(None, SMALL)
    with pytest.raises(ValueError, match="generate_text: no prompts"):
        api.generate_text(api.build_model(config), api.tokenizer(config), [])
