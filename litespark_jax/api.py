"""The Python API for notebooks and scripts: everything the CLIs do, as plain functions.

Each function is a thin layer over the module that owns the work (config, model, train loop, checkpoints, Hugging
Face conversion, generation, plots); nothing is implemented twice.

    from litespark_jax import api

    config = api.load_config("tiny", ["train.steps=100"])      # a preset name, a YAML path, or None (defaults)
    model = api.build_model(config)                              # random init (seed train.seed)
    tok = api.tokenizer(config)
    print(api.generate_text(model, tok, "def main():", max_new_tokens=40))
    result = api.train(config, callback=lambda step, m: print(step, m["loss"]))
    model = api.model_from_state(config, result.state)
    print(api.evaluate(config, model))                           # validation NLL, nats/token
    fig = api.plot_history(result)                               # loss / eval loss / tokens/s, inline
    api.save_checkpoint(config, result.state, "ckpt/")           # (train() already saves into checkpoint.dir)
    model, config = api.load_checkpoint("ckpt/")                 # newest good step, or "ckpt/<step>"
    api.export_hf(api.latest_checkpoint(config), "hf_out/")      # LlamaForCausalLM directory
    model, config = api.import_hf("hf_out/", config)
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
from flax import nnx

from litespark_jax import config as config_lib
from litespark_jax import generation
from litespark_jax.config import Config
from litespark_jax.errors import ConfigError
from litespark_jax.generation import SamplingConfig

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

__all__ = [
    "SamplingConfig", "build_model", "chat_template", "evaluate", "export_hf", "generate", "generate_text",
    "import_hf", "latest_checkpoint", "load_checkpoint", "load_config", "model_from_state", "override",
    "plot_history", "plot_runs", "save_checkpoint", "tokenizer", "train",
]


# ----------------------------------------------------------------------------------------------------------------
# Config


def load_config(preset: str | None = None, overrides: str | Sequence[str] = ()) -> Config:
    """A validated Config from a preset name in ``configs/`` (``"tiny"``), a YAML path, or None (the built-in
    defaults), with ``section.key=value`` overrides applied."""
    path = preset
    overrides = _as_list(overrides)
    if preset is not None and not os.path.exists(preset):
        candidate = os.path.join(CONFIGS_DIR, f"{preset}.yaml")
        if os.path.isfile(candidate):
            path = candidate
    return config_lib.load_config(path, list(overrides))


def override(config: Config, *overrides: str) -> Config:
    """A copy of ``config`` with ``section.key=value`` overrides applied (validated again)."""
    raw = config.to_dict()
    for item in overrides:
        config_lib._apply_override(raw, item)
    new = config_lib.from_dict(raw, "override")
    config_lib.validate(new)
    return new


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_model(config: Config | config_lib.ModelConfig, seed: int | None = None):
    """A freshly initialized ``Llama`` (an nnx Module; call it with tokens for float32 logits). The seed defaults
    to ``train.seed``, which gives the same weights as the start of ``train(config)``."""
    from litespark_jax.train.state import init_model

    model_cfg = config.model if isinstance(config, Config) else config
    if seed is None:
        seed = config.train.seed if isinstance(config, Config) else 0
    graphdef, params = init_model(model_cfg, seed)
    return nnx.merge(graphdef, params)


def model_from_state(config: Config, state_or_params):
    """The ``Llama`` holding the parameters of a ``TrainState`` (e.g. ``train(...).state``) or of a params tree
    (an ``nnx.State`` or a pure dict as ``nnx.to_pure_dict`` gives). Parameters of another shape than
    ``config.model`` describes are a ConfigError naming the first that differs."""
    from litespark_jax.train.state import abstract_model

    params = getattr(state_or_params, "params", state_or_params)
    graphdef, abstract = abstract_model(config.model)
    _check_shapes(params, abstract)
    if not isinstance(params, nnx.State):
        nnx.replace_by_pure_dict(abstract, params)
        params = abstract
    return nnx.merge(graphdef, params)


def _check_shapes(params, abstract) -> None:
    """A ConfigError naming the first parameter missing, extra or shaped otherwise than the config's model (else
    the mismatch surfaced later as a reshape or scan error, or not at all)."""
    from litespark_jax.checkpoint.manager import first_mismatch

    def flat(tree) -> dict:
        pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
        return {jax.tree_util.keystr(path, simple=True, separator="."): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}

    have, want = flat(params), flat(abstract)
    mismatch = first_mismatch(have, want)
    if mismatch is None:
        return
    kind, name = mismatch
    if kind == "missing":
        raise ConfigError(f"the parameters have no {name!r} that config.model needs (a model of another shape?)")
    if kind == "shape":
        raise ConfigError(f"parameter {name!r} has shape {tuple(have[name].shape)} but config.model needs "
                          f"{tuple(want[name].shape)}")
    raise ConfigError(f"the parameters hold {name!r}, which config.model has no place for (a model of another "
                      f"shape?)")


def tokenizer(config: Config):
    """The tokenizer named by ``data.tokenizer`` (``encode``, ``decode``, ``bos_id``, ``eos_id``)."""
    from litespark_jax.data import build_tokenizer

    return build_tokenizer(config.data)


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation


def train(config: Config, *, steps: int | None = None, callback: Callable[[int, dict], None] | None = None):
    """Run the training loop (``litespark_jax.train.loop.train``) and return its ``TrainResult`` (``state``,
    ``history``, ``eval_history``). ``callback(step, metrics)`` is called at every logged step (``log.every``).
    Checkpoints go to ``checkpoint.dir`` and metrics to ``train.run_dir/metrics.jsonl``, as with the CLI."""
    from litespark_jax.train.loop import train as train_loop

    if steps is not None:
        config = override(config, f"train.steps={steps}")
    return train_loop(config, callback=callback)


def evaluate(config: Config, model_or_params) -> float:
    """Mean validation NLL (nats/token) over ``train.eval_batches`` batches of the validation split."""
    from litespark_jax.train.loop import Trainer
    from litespark_jax.train.state import abstract_model

    params = _params(model_or_params)
    _check_shapes(params, abstract_model(config.model)[1])
    trainer = Trainer(config)
    params = jax.device_put(params, trainer.state_sharding.params)
    return trainer.evaluate(params)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(config: Config, state, directory: str | None = None, step: int | None = None) -> str:
    """Save a ``TrainState`` as an orbax checkpoint (the format training resumes from) and wait until it is
    finalized; returns the step directory. ``directory`` defaults to ``checkpoint.dir`` (RUN_DIR/checkpoints)."""
    from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps
    from litespark_jax.checkpoint.session import checkpoint_dir
    from litespark_jax.errors import CheckpointError

    directory = os.path.abspath(os.path.expanduser(directory or checkpoint_dir(config)))
    step = int(jax.device_get(state.step)) if step is None else step
    if step in finalized_steps(directory):  # e.g. right after api.train, which saved its last step there
        raise CheckpointError(f"{directory}/{step} already exists (a training run saves its last step there); pass "
                              f"another directory or step to save this state")
    manager = CheckpointManager(directory, config.checkpoint)
    try:
        manager.save(step, state, config=config.to_dict(), seed=config.train.seed, force=True)
    finally:
        manager.close()
    return os.path.join(directory, str(step))


def latest_checkpoint(config_or_directory) -> str | None:
    """The newest finalized step directory of a config's ``checkpoint.dir`` (None while it has none), or of a
    checkpoint directory given by path (a path that is not one is a CheckpointError saying why, e.g. a run
    directory, whose checkpoints are in RUN_DIR/checkpoints)."""
    from litespark_jax.checkpoint.manager import finalized_steps, split_checkpoint_path
    from litespark_jax.checkpoint.session import checkpoint_dir

    if isinstance(config_or_directory, Config):
        directory = checkpoint_dir(config_or_directory)
        steps = finalized_steps(directory)
        return os.path.join(directory, str(steps[-1])) if steps else None
    directory, step = split_checkpoint_path(os.fspath(config_or_directory))
    return os.path.join(directory, str(step if step is not None else finalized_steps(directory)[-1]))


def load_checkpoint(path: str, overrides: Sequence[str] = (), *, with_state: bool = False):
    """``(model, config)`` from a checkpoint directory (its newest good step) or one step directory. The config is
    the one saved with the checkpoint, with ``overrides`` applied (e.g. a data path on this machine).
    ``with_state=True`` returns ``(model, config, train_state)`` to continue training from it."""
    from litespark_jax.checkpoint.manager import CheckpointManager, split_checkpoint_path
    from litespark_jax.train.loop import Trainer

    root, step = split_checkpoint_path(_checkpoint_path(path, "load_checkpoint"))
    manager = CheckpointManager(root, read_only=True)
    try:
        raw = manager.read_config(step)
        if not raw:
            raise ConfigError(f"checkpoint {path} carries no config; build the config and use model_from_state")
        config = override(config_lib.from_dict(raw, f"{path} (saved config)"), *overrides)
        restored = Trainer(config).restore_state(manager, step)
    finally:
        manager.close()
    model = model_from_state(config, restored.state)
    return (model, config, restored.state) if with_state else (model, config)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face


def export_hf(source, out_dir: str, config: Config | None = None, **kwargs) -> str:
    """Write a ``LlamaForCausalLM`` directory (config.json, safetensors, the tokenizer) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads, via ``litespark_jax.convert.export_hf``.

    ``source``: a checkpoint directory or step directory (e.g. ``latest_checkpoint(config)``), or an in-memory
    model / ``TrainState`` together with its ``config`` (saved to a temporary checkpoint first, then exported).
    ``kwargs`` go to ``convert.export_hf`` (``dtype="bfloat16"``, ``max_shard_size``, ``tokenizer``)."""
    import tempfile

    from litespark_jax import convert
    from litespark_jax.train.state import abstract_model

    if source is None or isinstance(source, (str, os.PathLike)):
        source = _checkpoint_path(source, "export_hf")
        if config is not None:  # the checkpoint's saved config describes it; a second one would be ignored
            raise ConfigError("export_hf: a checkpoint path carries its own config; pass config only with an "
                              "in-memory model or TrainState")
        return convert.export_hf(os.fspath(source), out_dir, **kwargs)
    if config is None:
        raise ConfigError("export_hf of an in-memory model needs its config: export_hf(model, out_dir, config)")
    params = _params(source)
    _check_shapes(params, abstract_model(config.model)[1])
    state = source if hasattr(source, "opt_state") else _fresh_state(config, params)
    with tempfile.TemporaryDirectory(prefix="litespark_export_") as tmp:
        step_dir = save_checkpoint(config, state, tmp)
        return convert.export_hf(step_dir, out_dir, **kwargs)


def import_hf(hf_dir: str, config: Config | None = None, out: str | None = None):
    """``(model, config)`` from a local Hugging Face Llama directory (``litespark_jax.convert.import_hf``): the
    config takes the HF model shape, everything else from ``config`` (default: the defaults). With ``out``, a
    step-0 checkpoint is also written there that ``train.resume=<out>`` continues from."""
    from litespark_jax import convert

    config, params = convert.import_hf(hf_dir, out, config=config)
    return model_from_state(config, params), config


def _checkpoint_path(path, caller: str) -> str:
    """``path`` as a string; None (what ``latest_checkpoint(config)`` returns before any step is saved) is a
    ConfigError saying so, instead of a TypeError or an error about a missing config."""
    if path is None:
        raise ConfigError(f"{caller}: the checkpoint path is None; latest_checkpoint(config) returns None while "
                          f"the config's checkpoint.dir holds no finalized step (train first, or pass a path)")
    return os.fspath(path)


def _as_list(items) -> list:
    """A sequence of strings; one string is taken as a list of one (not as its characters)."""
    return [items] if isinstance(items, (str, os.PathLike)) else list(items)


def _fresh_state(config: Config, params):
    """A step-0 ``TrainState`` around ``params`` with a fresh optimizer state (the checkpoint format wants one)."""
    import jax.numpy as jnp

    from litespark_jax.train.optimizer import build_optimizer
    from litespark_jax.train.state import TrainState

    optimizer = build_optimizer(config.optim, config.train.steps)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _params(model):
    return nnx.state(model) if isinstance(model, nnx.Module) else getattr(model, "params", model)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig()) -> list[list[int]]:
    """New token ids for each prompt (KV-cache decoding, ``litespark_jax.generation.generate``)."""
    return generation.generate(model, prompts, sampling)


def chat_template(config: Config, tok=None):
    """The run's chat template (``posttrain.template``, ``posttrain.system_prompt``) bound to its tokenizer: how
    SFT/DPO rendered conversations, so generation can render prompts and stop at the end of a turn the same way."""
    from litespark_jax.posttrain.template import TemplateTokens, get_template

    p = config.posttrain
    return TemplateTokens(get_template(p.template), tok or tokenizer(config), p.system_prompt)


def generate_text(model, tok, prompt: str | Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                  add_bos: bool = True, template=None, chat: bool = False) -> str | list[str]:
    """The continuation of ``prompt`` (a string, or a list of them for a batch) as text. Greedy when
    ``temperature`` is 0; otherwise sampled with optional top-k / top-p. Training frames every document as
    BOS ... EOS, so the prompt starts with BOS and generation stops at EOS.

    ``template`` (``chat_template(config)``): a fine-tuned model ends its answer with the template's end-of-turn
    token, never EOS, so generation stops at either. ``chat=True`` (needs ``template``) sends each prompt as a user
    turn followed by the assistant header, as SFT trained on."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts:
        raise ValueError("generate_text: no prompts (give a string or a non-empty list of them)")
    if chat:
        if template is None:
            raise ConfigError("chat generation needs the chat template the model was fine-tuned with")
        template.check_vocab(model.cfg.vocab_size)
        ids = [template.render([{"role": "user", "content": t}], require_assistant=False)[0]
               + template.generation_prompt() for t in texts]
    else:
        ids = [([tok.bos_id] if add_bos else []) + list(tok.encode(t)) for t in texts]
    stops = {tok.eos_id}
    if template is not None:
        stops.add(template.special_ids[template.template.end_of_turn])
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, eos_id=stops if stop_at_eos else None)
    outs = generation.generate(model, ids, sampling)
    decoded = [tok.decode([i for i in out if i not in stops]) for out in outs]
    return decoded[0] if isinstance(prompt, str) else decoded


# ----------------------------------------------------------------------------------------------------------------
# Plots


def plot_history(result, label: str = "run"):
    """A matplotlib Figure of an in-memory ``TrainResult`` (loss, validation loss, tokens/s, MFU when known)."""
    from litespark_jax import plot

    return plot.overview_figure([plot.runs_from_history(result.history, result.eval_history, label)])


def plot_runs(run_dirs: str | Sequence[str], out_dir: str | None = None,
              labels: str | Sequence[str] | None = None) -> list[str]:
    """PNG plots comparing the ``metrics.jsonl`` of one or several runs (``python -m litespark_jax.plot``)."""
    from litespark_jax import plot

    return plot.plot_runs(_as_list(run_dirs), out_dir, _as_list(labels) if labels else None)
