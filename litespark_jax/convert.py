"""Hugging Face import and export of Llama checkpoints.

    python -m litespark_jax.convert to-hf --checkpoint runs/tiny/checkpoints --out hf/tiny [--dtype bfloat16]
    python -m litespark_jax.convert from-hf --hf-dir meta-llama-3.2-1b --out runs/llama/checkpoints \
        [--config configs/llama-3.2-1b.yaml] [section.key=value ...]

``to-hf`` writes ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` above ``--max-shard-size``), ``generation_config.json`` with the tokenizer's BOS/EOS
(/PAD) ids (also in ``config.json``) and the run's tokenizer; the directory loads with
``transformers.LlamaForCausalLM.from_pretrained`` and no code of ours. ``from-hf`` reads a local Llama 2 / Llama 3
directory (safetensors, single or sharded, tied or untied embeddings, Llama-3 RoPE scaling) and writes a step-0
checkpoint (parameters plus a fresh optimizer state) that ``train.resume=<out>`` continues from.

RoPE layout: ``transformers`` Llama checkpoints store q/k projections in the half-split ("rotate_half") layout,
which is also ours, so the name-mapping table in ``litespark_jax.hf`` only transposes and reshapes. Meta's original
``consolidated.*.pth`` files use the interleaved layout; convert those with transformers'
``convert_llama_weights_to_hf.py`` first (this module rejects directories without safetensors).

From Python (notebooks): ``export_hf(checkpoint, out_dir)``, ``import_hf(hf_dir, out=None) -> (Config, params)``
and ``load_hf_params(hf_dir) -> (ModelConfig, params)`` where ``params`` is our pure parameter dict of numpy arrays
(``state = nnx.state(model); nnx.replace_by_pure_dict(state, params); nnx.update(model, state)`` puts it into a
``Llama``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys

import numpy as np

from litespark_jax.cli import ArgumentParser
from litespark_jax.config import Config, ModelConfig, from_dict, load_config, validate
from litespark_jax.data.tokenizers import BYTE_FILE, HF_FILE, SENTENCEPIECE_FILE
from litespark_jax.errors import CheckpointError, ConfigError, UserError
from litespark_jax.hf import from_hf_state_dict, hf_config, to_hf_state_dict, unexpected_hf_tensors

log = logging.getLogger("litespark_jax")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GENERATION_CONFIG = "generation_config.json"
# What an earlier export may have left describing the old tokenizer: the files our tokenizers' ``save`` writes
# (a leftover tokenizer.json is loaded before a new byte_tokenizer.json), the generation config, and transformers'
# tokenizer side files, which would pair stale special tokens with a new tokenizer.json.
_TOKENIZER_FILES = (HF_FILE, SENTENCEPIECE_FILE, BYTE_FILE, GENERATION_CONFIG, "tokenizer_config.json",
                    "special_tokens_map.json")
_DTYPES = {"float32": np.float32, "bfloat16": None, "float16": np.float16}


# ----------------------------------------------------------------------------------------------------------------
# Export


def export_hf(checkpoint: str, out_dir: str, *, dtype: str | None = None, max_shard_size: int = 5 * 10**9,
              tokenizer: bool = True) -> str:
    """Write a Hugging Face Llama directory from a checkpoint directory (its newest good step) or one step dir.

    ``dtype``: float32, bfloat16 or float16 (default: the parameters' dtype). Returns ``out_dir``.
    """
    from litespark_jax.checkpoint.manager import CheckpointManager, split_checkpoint_path

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # checked before the (long) read of the weights
        raise UserError(f"{out_dir}: is a file, not a directory to write the Hugging Face model into")
    root, step = split_checkpoint_path(checkpoint)
    manager = CheckpointManager(root, read_only=True)
    try:
        restored = manager.restore_arrays("params.", step)
    finally:
        manager.close()
    try:
        config = from_dict(restored.config, source=f"{restored.path}/config")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {restored.path} has an unreadable config: {e}") from None
    params = _unflatten_dotted({k: np.asarray(v) for k, v in restored.state.items()})
    tensors = to_hf_state_dict(params, config.model)
    out_dtype = dtype or config.model.param_dtype
    if out_dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {out_dtype!r}")
    tensors = {k: _cast(v, out_dtype) for k, v in tensors.items()}
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(tensors, out_dir, max_shard_size)
    for name in _TOKENIZER_FILES:  # a previous export's tokenizer would load in place of (or beside) the new one
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    tok = _build_tokenizer(config)
    # Without the ids transformers assumes BOS=1, EOS=2 (wrong for e.g. the byte tokenizer's EOS=257).
    special = {} if tok is None else _special_token_ids(tok, config.model.vocab_size)
    hf = {**hf_config(config.model), **special}
    hf["torch_dtype"] = out_dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if special:
        with open(os.path.join(out_dir, GENERATION_CONFIG), "w") as f:
            json.dump(special, f, indent=2)
    if tokenizer and tok is not None:
        try:
            tok.save(out_dir)
        except Exception as e:  # noqa: BLE001 - the weights are the product; a missing tokenizer file is a warning
            log.warning("warning: the tokenizer (%s) was not written: %s", config.data.tokenizer, e)
    log.info("exported %s (step %d) to %s", restored.path, restored.step, out_dir)
    return out_dir


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(_DTYPES[dtype])


def _write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_size: int) -> None:
    from safetensors.numpy import save_file

    for name in os.listdir(out_dir):  # a previous export's shards must not linger next to the new index
        if name.endswith(".safetensors") or name == SAFETENSORS_INDEX:
            os.remove(os.path.join(out_dir, name))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _save_bf16_aware(save_file, shards[0], os.path.join(out_dir, SAFETENSORS_SINGLE), metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_bf16_aware(save_file, shard, os.path.join(out_dir, filename), metadata)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump(index, f, indent=2)


def _save_bf16_aware(save_file, shard: dict, path: str, metadata: dict) -> None:
    if any(a.dtype.name == "bfloat16" for a in shard.values()):
        # safetensors' numpy writer has no bfloat16; the flax (jax) writer has.
        import jax.numpy as jnp
        from safetensors.flax import save_file as save_jax

        save_jax({k: jnp.asarray(v) for k, v in shard.items()}, path, metadata=metadata)
    else:
        save_file(shard, path, metadata=metadata)


def _build_tokenizer(config: Config):
    """The run's tokenizer (``data.tokenizer``), or None with a warning: the weights are the product."""
    try:
        from litespark_jax import data as data_lib

        return data_lib.build_tokenizer(config.data)
    except Exception as e:  # noqa: BLE001 - e.g. the tokenizer file moved since training
        log.warning("warning: the tokenizer (%s) could not be loaded, so neither it nor its BOS/EOS ids were "
                    "written: %s", config.data.tokenizer, e)
        return None


def _special_token_ids(tok, vocab_size: int) -> dict:
    """BOS/EOS (and PAD when the tokenizer has its own; ours fall back to EOS) as config.json names them, less ids
    outside the model's vocabulary (transformers rejects those; a pad_token_id there even breaks loading)."""
    ids = {"bos_token_id": int(tok.bos_id), "eos_token_id": int(tok.eos_id)}
    if tok.pad_id != tok.eos_id:
        ids["pad_token_id"] = int(tok.pad_id)
    outside = [f"{k}={v}" for k, v in ids.items() if not 0 <= v < vocab_size]
    if outside:
        log.warning("warning: the tokenizer's %s lie outside the model's vocabulary (%d) and were not written",
                    ", ".join(outside), vocab_size)
    return {k: v for k, v in ids.items() if 0 <= v < vocab_size}


# ----------------------------------------------------------------------------------------------------------------
# Import


def model_config_from_hf(hf: dict, base: ModelConfig = ModelConfig(), source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF Llama ``config.json`` (numerics and kernel choices are kept from ``base``)."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got a JSON {_json_type(hf)}")
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise CheckpointError(f"{source}: unsupported architecture {architectures or hf.get('model_type')!r} "
                              f"(model_type {hf.get('model_type')!r}); only Llama ({', '.join(SUPPORTED_ARCHITECTURES)}) "
                              f"can be imported")
    for key, unsupported in (("attention_bias", True), ("mlp_bias", True)):
        if hf.get(key) is unsupported:
            raise CheckpointError(f"{source}: {key}=true is not supported (our Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling.
    rope = _json_object(hf, "rope_parameters", source) or {}
    scaling = _json_object(hf, "rope_scaling", source) or (
        rope if rope.get("rope_type", "default") != "default" else None)
    rope_theta = _number(rope, "rope_theta", source, _number(hf, "rope_theta", source, 10000.0))
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            rope_scaling = None
        elif kind == "llama3":
            rope_scaling = {k: _number(scaling, k, source, None, f"rope_scaling.{k}") for k in _LLAMA3_ROPE_KEYS}
            missing = [k for k, v in rope_scaling.items() if v is None]
            if missing:
                raise CheckpointError(f"{source}: llama3 rope_scaling is missing {', '.join(missing)}")
        else:
            raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (only llama3 or none)")
    d, heads = _positive_int(hf, "hidden_size", source), _positive_int(hf, "num_attention_heads", source)
    head_dim = _positive_int(hf, "head_dim", source, None)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CheckpointError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")
    return dataclasses.replace(
        base,
        vocab_size=_positive_int(hf, "vocab_size", source),
        d_model=d,
        num_layers=_positive_int(hf, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=_positive_int(hf, "num_key_value_heads", source, heads),
        head_dim=None if head_dim in (None, d // heads) else head_dim,
        d_ff=_positive_int(hf, "intermediate_size", source),
        max_seq_len=_positive_int(hf, "max_position_embeddings", source, base.max_seq_len),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        norm_eps=float(_number(hf, "rms_norm_eps", source, 1e-6)),
        tie_embeddings=tie,
    )


_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_REQUIRED = object()


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _json_object(hf: dict, key: str, source: str) -> dict | None:
    """``hf[key]`` when it is an object; None when absent or null (HF writes null for "not set")."""
    value = hf.get(key)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"{source}: {key} must be an object or null, got a JSON {_json_type(value)}")
    return value


def _positive_int(hf: dict, key: str, source: str, default=_REQUIRED):
    """``hf[key]`` as a positive integer (JSON true is not 1 here); ``default`` when optional and absent or null."""
    if key not in hf and default is _REQUIRED:
        raise CheckpointError(f"{source}: missing key {key!r}")
    value = hf.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _number(hf: dict, key: str, source: str, default, name: str | None = None):
    """``hf[key]`` as a finite positive number (int or float, not bool); ``default`` when absent or null."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{source}: {name or key} must be a positive number, got {value!r}")
    return value


def read_hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a local safetensors Llama directory (single file or index + shards) as numpy arrays."""
    from safetensors import safe_open

    index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(hf_dir, SAFETENSORS_SINGLE)):
        files = [SAFETENSORS_SINGLE]
    else:
        other = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pth", ".pt"))]
        hint = f" (found {other[0]}: convert PyTorch pickles to safetensors first)" if other else ""
        raise CheckpointError(f"{hf_dir} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}{hint}")
    missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
    if missing:
        raise CheckpointError(f"{hf_dir}: shard {missing[0]} listed in {SAFETENSORS_INDEX} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors = {}
    for filename in files:
        path = os.path.join(hf_dir, filename)
        try:
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path}: unreadable safetensors file ({' '.join(str(e).split())})") from None
    return tensors


def load_hf_params(hf_dir: str, base: ModelConfig = ModelConfig()) -> tuple[ModelConfig, dict]:
    """(ModelConfig, our pure parameter dict of numpy arrays in ``param_dtype``) from a local HF Llama directory."""
    from litespark_jax.train.state import abstract_model
    from flax import nnx

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"Hugging Face directory {hf_dir} does not exist")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    cfg = model_config_from_hf(hf, base, source=config_path)
    tensors = read_hf_tensors(hf_dir)
    try:
        params = from_hf_state_dict(tensors, cfg)
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}: tensor {e.args[0]!r} is missing") from None
    except ValueError as e:  # reshape of a tensor whose size disagrees with config.json
        raise CheckpointError(f"{hf_dir}: a tensor's shape disagrees with config.json ({e})") from None
    unexpected = unexpected_hf_tensors(tensors, cfg)
    if unexpected:  # e.g. a layer beyond num_hidden_layers: importing without it would silently change the model
        raise CheckpointError(f"{hf_dir}: {len(unexpected)} tensor(s) are not part of the {cfg.num_layers}-layer Llama "
                              f"config.json describes: {', '.join(unexpected[:3])}"
                              + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    _, abstract = abstract_model(cfg)
    expected = _flatten_dotted(nnx.to_pure_dict(abstract))
    got = _flatten_dotted(params)
    for name, spec in expected.items():
        if name not in got:
            raise CheckpointError(f"{hf_dir}: no tensor for parameter {name!r}")
        if tuple(got[name].shape) != tuple(spec.shape):
            raise CheckpointError(f"{hf_dir}: parameter {name!r} has shape {tuple(got[name].shape)} but config.json "
                                  f"implies {tuple(spec.shape)}")
    dtype = np.dtype(_cast(np.zeros(1, np.float32), cfg.param_dtype).dtype)
    return cfg, _unflatten_dotted({k: np.asarray(v).astype(dtype) for k, v in got.items() if k in expected})


# The model fields a Hugging Face config.json fixes: a model section that differs in any of them cannot hold its weights.
SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "resolved_head_dim", "d_ff",
                "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps")


def shape_difference(source: str, theirs, ours, who: str) -> str | None:
    """None when ``ours`` (a ModelConfig) describes the shape of ``theirs`` (read from ``source``: an HF
    directory's config.json, or a checkpoint's saved config), else a message naming the first field that differs,
    blamed on ``who``."""
    for field in SHAPE_FIELDS:
        if getattr(theirs, field) != getattr(ours, field):
            return (f"{who}: {source} gives {field}={getattr(theirs, field)!r} but model.{field} is "
                    f"{getattr(ours, field)!r}; make the model section match")
    return None


def import_hf(hf_dir: str, out: str | None = None, *, config: Config | None = None,
              model_must_match: str | None = None) -> tuple[Config, dict]:
    """Import an HF Llama: returns (Config with the HF model shape, our pure parameter dict). With ``out``, also
    writes a step-0 checkpoint (parameters, a fresh optimizer state, the config) into that directory.

    ``model_must_match``: the name of where ``config`` came from (``--config X``); its model section must then
    describe the HF model's shape (a ConfigError naming the first field that differs), since training goes on
    with that config. Otherwise ``config``'s model section is replaced by the HF one."""
    base = config or Config()
    model_cfg, params = load_hf_params(hf_dir, base.model)
    if model_must_match and (problem := shape_difference(f"{hf_dir}/config.json", model_cfg, base.model,
                                                         model_must_match)):
        raise ConfigError(problem)
    full = dataclasses.replace(base, model=model_cfg)
    validate(full)
    if out is not None:
        _write_step0(full, params, out)
        tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
        if os.path.isfile(tokenizer_json):
            shutil.copy(tokenizer_json, os.path.join(out, "tokenizer.json"))
            log.info("copied the tokenizer: train with data.tokenizer=%s", os.path.join(out, "tokenizer.json"))
    return full, params


def _write_step0(config: Config, params: dict, out: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps
    from litespark_jax.train.optimizer import build_optimizer
    from litespark_jax.train.state import TrainState, abstract_model

    if finalized_steps(out):
        raise CheckpointError(f"{out} already holds checkpoints {finalized_steps(out)}; import into a new directory")
    _, state = abstract_model(config.model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    optimizer = build_optimizer(config.optim, config.train.steps)
    train_state = TrainState(step=jnp.zeros((), jnp.int32), params=state, opt_state=optimizer.init(state))
    manager = CheckpointManager(out, dataclasses.replace(config.checkpoint, async_save=False))
    try:
        manager.save(0, train_state, data_state=None, config=config.to_dict(), seed=config.train.seed, force=True)
    finally:
        manager.close()


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _flatten_dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_dotted(value, name + "."))
        else:
            out[name] = value
    return out


def _unflatten_dotted(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


# As save_pretrained counts them: KB/MB/GB (and K/M/G) are powers of 10, so 5GB = 5 * 10**9; KiB/MiB/GiB powers of 2.
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
               "G": 10**9, "GB": 10**9, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``--max-shard-size`` in bytes (an argparse ``type``, so a bad value is argparse's error naming the flag)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip(), re.IGNORECASE)
    if match is None or match[2].upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: expected a number and an optional unit, e.g. "
                                         "5GB (5 * 10**9 bytes), 5GiB (5 * 2**30), 500MB or 1024 (bytes)")
    size = int(float(match[1]) * _SIZE_UNITS[match[2].upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard must be allowed at least 1 byte")
    return size


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.convert",
                            description="Convert between LiteSpark checkpoints and Hugging Face Llama.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="export a checkpoint as a transformers LlamaForCausalLM directory")
    to_hf.add_argument("--checkpoint", required=True, help="checkpoint directory (newest good step) or a step dir")
    to_hf.add_argument("--out", required=True, help="output directory")
    to_hf.add_argument("--dtype", default=None, choices=list(_DTYPES), help="tensor dtype (default: as trained)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="5GB",
                       help="largest safetensors shard: 5GB = 5 * 10**9 bytes as in save_pretrained, 5GiB = 5 * 2**30, "
                            "also 500MB, 500M, or a number of bytes (default 5GB)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="do not write the tokenizer")
    from_hf = sub.add_parser("from-hf", help="import a local Hugging Face Llama directory as a step-0 checkpoint")
    from_hf.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    from_hf.add_argument("--out", required=True, help="checkpoint directory to create")
    from_hf.add_argument("--config", default=None, help="YAML preset for the non-model sections (optimizer, ...)")
    from_hf.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a config value")
    args = parser.parse_args(argv)
    from litespark_jax.cli import require_output_dir

    require_output_dir(to_hf if args.command == "to-hf" else from_hf, "--out", args.out)
    if args.command == "to-hf":
        export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  tokenizer=not args.no_tokenizer)
    else:
        config = load_config(args.config, args.overrides)
        full, _ = import_hf(args.hf_dir, args.out, config=config,
                            model_must_match=f"--config {args.config}" if args.config else None)
        m = full.model
        print(f"wrote {args.out}/0: {m.num_params() / 1e6:.1f}M params, {m.num_layers} layers, d_model {m.d_model}; "
              f"continue with train.resume={args.out}")
    return 0


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
