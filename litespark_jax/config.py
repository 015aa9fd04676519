"""Typed run configuration: one frozen dataclass per concern, loaded from YAML with dotted CLI overrides.

Every mistake becomes one ``ConfigError`` sentence naming the key (``model.num_heads``), the file it came from and
what would be right. Presets in ``configs/`` override only the defaults they need.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any

import yaml

from litespark_jax.data.config import DataConfig
from litespark_jax.errors import ConfigError
from litespark_jax.paths import expand_home
from litespark_jax.posttrain.config import PosttrainConfig

REMAT_POLICIES = ("none", "full", "save_matmuls", "save_attention", "names")
# Activations of a decoder layer that remat_policy=names can keep for the backward (checkpoint_name in the model).
ACTIVATION_NAMES = ("attention_in", "query", "key", "value", "attention_out", "attention_proj", "residual_mid",
                    "mlp_in", "mlp_gate_up", "mlp_out")
DTYPES = ("float32", "bfloat16", "float16")


DEFAULT_COMPILATION_CACHE_DIR = "~/.cache/litespark_jax/xla"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int = 512
    """Rows of the embedding table; must be >= the tokenizer's vocabulary."""
    d_model: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Decoder layers (stacked; with scan_layers they run in a scan, so compile time does not grow with depth)."""
    num_heads: int = 8
    """Query heads."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide num_heads."""
    head_dim: int | None = None
    """Per-head width; null means d_model // num_heads."""
    d_ff: int = 768
    """Hidden width of the SwiGLU MLP."""
    max_seq_len: int = 2048
    """Longest sequence the model is configured for (RoPE tables and validation)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """Llama-3 frequency scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Use the embedding table as the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initializer for matrices."""
    dtype: str = "float32"
    """Compute dtype of activations and matmuls (parameters stay in param_dtype)."""
    param_dtype: str = "float32"
    """Storage dtype of parameters."""
    remat_policy: str = "none"
    """What each layer keeps for the backward: none (keep all), full (recompute all), save_matmuls, save_attention,
    or names (keep only the activations named in remat_save_names)."""
    remat_save_names: tuple = ()
    """Activation names kept under remat_policy=names: attention_in, query, key, value, attention_out,
    attention_proj, residual_mid (the residual stream between attention and MLP), mlp_in, mlp_gate_up (the MLP's
    [tokens, 2, d_ff] pre-activation), mlp_out."""
    scan_layers: bool = True
    """Run the layer stack with lax.scan. False unrolls it: same numbers, longer compile, and on a GPU faster (no
    scan-stacked residual buffers to zero-fill and copy into; the 3B/1B presets use it)."""
    cast_weights_once: bool = False
    """Cast the layers' weight matrices to the compute dtype once per step, before the layer stack, instead of
    inside each layer (where a remat backward casts them again): one pass over the weights instead of two or three,
    and weight gradients in the compute dtype until the optimizer; costs 2 bytes per parameter held through the step."""
    attention_impl: str = "auto"
    """Attention kernel: auto, reference, cudnn, pallas (see pallas_kernels)."""
    mlp_impl: str = "auto"
    """MLP kernel: auto, reference, or a fused implementation."""
    cross_entropy_impl: str = "auto"
    """Loss kernel: auto, reference, or a fused implementation."""
    rms_norm_impl: str = "auto"
    """RMSNorm kernel: auto, reference, or a fused implementation."""
    kernel_table: str | None = None
    """A tuned dispatch table (JSON from python -m litespark_jax.autotune): kernels left on auto use its measured
    choice for the exact calls it timed on this device kind, the built-in rule elsewhere."""

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def num_params(self) -> int:
        """Total trainable parameters (the tied embedding counted once)."""
        d, f, hd = self.d_model, self.d_ff, self.resolved_head_dim
        attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to a floor, and global-norm clipping."""

    learning_rate: float = 3e-4
    """Peak learning rate, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to the peak."""
    decay_steps: int | None = None
    """Steps of the cosine decay (after warmup); null means until train.steps."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (never on norms or biases)."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm; 0 disables clipping."""
    state_dtype: str = "float32"
    """Dtype in which both Adam moments are stored (the update is computed in float32)."""
    offload_state: bool = False
    """Keep the Adam moments in pinned host memory between steps; each step streams them through the device one
    parameter at a time, the copies in and out overlapped (train/offload.py). Frees the moments' device memory but
    the two largest parameters' (in flight during the update), for about one host transfer of all of them per step:
    for a model that does not fit otherwise, not for speed (``python -m litespark_jax.plan`` says if it fits)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: how long, how big, how often to evaluate and log."""

    steps: int = 1000
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all devices and micro-batches."""
    seq_len: int = 256
    """Tokens per sequence (packed window)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global_batch_size must be divisible by it."""
    seed: int = 0
    """Seed of parameter init and data order; same seed, same losses."""
    z_loss_weight: float = 0.0
    """Weight of the z-loss (logsumexp squared) that keeps logits from drifting."""
    eval_every: int = 200
    """Evaluate on the validation split every this many steps (0 = only at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    run_dir: str = "runs/default"
    """Where metrics, TensorBoard events and checkpoints go (a leading ~ is the home directory)."""
    peak_tflops_per_device: float | None = None
    """Peak dense TFLOP/s for MFU; null detects H100/H200 (989) and shows no MFU elsewhere."""
    xla_options: dict | None = None
    """XLA compiler options for the train step (``jax.jit(compiler_options=...)``), e.g.
    ``{xla_gpu_enable_latency_hiding_scheduler: true}``. Per compilation, unlike XLA_FLAGS, so bench variants can
    differ in them within one process; an unknown name or bad value stops the run before the first step."""
    resume: str = "auto"
    """Where to start from: auto (the latest good checkpoint in checkpoint.dir, else from scratch), never (always
    from scratch), or a checkpoint directory (its latest good step, or one step's directory)."""
    resume_data: bool = True
    """Continue the checkpoint's data stream where it stopped. false: restore the model and optimizer but start the
    data stream afresh, e.g. after changing data.train_files, data.mixture or data.shuffle on purpose (a resume
    that would not continue the same stream of batches is otherwise refused)."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient is NaN/inf is never applied (the state keeps its previous values); then: stop
    (exit at the next log point or save with a one-line error, the last good checkpoint intact) or skip (count it in
    the metric nonfinite_skipped and go on)."""
    spike_factor: float = 0.0
    """Loss-spike detection: a logged loss above spike_factor x the mean of the previous spike_window logged losses
    is a spike (0 disables)."""
    spike_window: int = 20
    """How many previous logged losses the spike test averages (it starts once the window is full)."""
    on_spike: str = "ignore"
    """What a spike does: ignore (warn and count it) or rollback (restore the last checkpoint, skip the data batches
    consumed since it, count it in the metric rollbacks)."""
    max_rollbacks: int = 3
    """Stop with an error after this many spike rollbacks in one process (a spike that keeps recurring)."""
    compilation_cache_dir: str | None = DEFAULT_COMPILATION_CACHE_DIR
    """JAX's persistent compilation cache for the command-line runs: a restart with the same program loads the
    compiled steps instead of compiling them again (1B preset on an H100: first step after 13.6 s instead of 29.4 s).
    null turns it off; a directory in JAX_COMPILATION_CACHE_DIR wins. On several processes only a directory set here
    is used (put it where every host can read it)."""
    compilation_cache_max_gb: float | None = 16.0
    """Size limit of that cache directory in GB: past it the least recently used programs are deleted. null keeps
    every program (jax's default)."""

    def __post_init__(self):
        expand_home(self, "run_dir")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; -1 fills with the devices left over. Their product must equal the device count."""

    data: int = 1
    """Pure data parallelism (replicated parameters)."""
    fsdp: int = -1
    """Fully sharded data parallelism (parameters, gradients and optimizer state sharded)."""
    tensor: int = 1
    """Megatron-style tensor parallelism over heads and MLP width."""
    context: int = 1
    """Context (sequence) parallelism."""
    inter_node_data: int = -1
    """How many nodes the data axis spans (its inter-node factor; the rest of mesh.data is within a node); -1 =
    auto: the node count left over by the other inter_node_* sizes goes to data, then fsdp, context, tensor."""
    inter_node_fsdp: int = -1
    """Inter-node factor of mesh.fsdp (-1 = auto, see inter_node_data)."""
    inter_node_tensor: int = 1
    """Inter-node factor of mesh.tensor (keep 1: tensor parallelism wants NVLink)."""
    inter_node_context: int = -1
    """Inter-node factor of mesh.context (-1 = auto, see inter_node_data)."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: where, how often, which ones are kept, and whether saving overlaps training."""

    dir: str | None = None
    """Checkpoint directory; null means RUN_DIR/checkpoints (a leading ~ is the home directory)."""
    every: int = 1000
    """Save every this many steps (0 = only at the end of training and on preemption)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints (older ones are deleted once a newer one is finalized)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this forever (0 = none)."""
    async_save: bool = True
    """Write checkpoints in the background while training continues (only the device-to-host copy blocks)."""

    def __post_init__(self):
        expand_home(self, "dir")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """What the run reports and where."""

    every: int = 10
    """Write metrics every this many steps."""
    progress_bar: bool = True
    """Show a progress bar with loss, tokens/s, MFU and ETA."""
    jsonl: bool = True
    """Write metrics to RUN_DIR/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tensorboard."""
    profile_start: int = 0
    """Trace log.profile_steps steps from this step with jax.profiler into RUN_DIR/profile and print where their
    device time went (0: no profile). Start after compilation and warm-up, e.g. 10."""
    profile_steps: int = 3
    """How many steps the profile traces."""


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    posttrain: PosttrainConfig = PosttrainConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "posttrain": PosttrainConfig,
}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML preset (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    source = "command line"
    if path is not None:
        source = path
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:  # decoded here, not by the YAML reader, so a bad byte's offset is from the start of the file
            with open(path, "rb") as f:
                raw = yaml.safe_load(f.read().decode("utf-8")) or {}
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or _one_line(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text: byte {e.start} ({e.object[e.start]:#04x}) cannot be "
                              f"decoded ({e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    from_command_line = {}
    for override in overrides:
        from_command_line[_apply_override(raw, override, source)] = f"command line ({override})"
    config = from_dict(raw, source, from_command_line)
    validate(config)
    return config


def from_dict(raw: dict, source: str = "config", key_sources: dict | None = None) -> Config:
    """Build a Config from nested dicts, checking every key and value type. ``key_sources`` maps (section, key)
    to where that value came from when not ``source`` (a command-line override), for the error that names it."""
    sections = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"{source}: top-level key {name!r} ({type(name).__name__}) is not a section name "
                              "(YAML reads an unquoted 4 or yes as a number or bool)")
        if name not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section {name!r}{_did_you_mean(name, _SECTION_TYPES)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(value).__name__}")
        sections[name] = _build_section(name, _SECTION_TYPES[name], value, source, key_sources or {})
    return Config(**sections)


def _build_section(name: str, cls: type, values: dict, source: str, key_sources: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        source_of_key = key_sources.get((name, key), source)
        if not isinstance(key, str):
            raise ConfigError(f"{source}: section {name!r} has key {key!r} ({type(key).__name__}), not a field name "
                              "(YAML reads an unquoted 4 or yes as a number or bool)")
        if key not in fields:
            raise ConfigError(f"{source_of_key}: unknown key '{name}.{key}'"
                              f"{_did_you_mean(key, fields, prefix=name + '.')}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key], source_of_key)
    return cls(**kwargs)


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats, lists for tuples."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{source}: '{key}' must not be empty (expected {_type_name(annotation)})")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if origin is str and isinstance(value, str):
            return value
        if origin is dict and isinstance(value, dict):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    raise ConfigError(
        f"{source}: '{key}' must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
    )


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _type_name(annotation) -> str:
    if _is_union(annotation):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation))


def _apply_override(raw: dict, override: str, source: str = "command line") -> tuple[str, str]:
    """Apply ``section.key=value`` and return (section, key); the value is parsed as YAML (``8``, ``1e-3``,
    ``true``, ``[a, b]``). ``source`` names where ``raw`` came from, for a section there that is not a mapping."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.steps=200)")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {override!r}: the key must be section.key (e.g. model.num_heads)")
    section, key = parts
    if section not in _SECTION_TYPES:
        raise ConfigError(f"command line ({override}): unknown section {section!r}"
                          f"{_did_you_mean(section, _SECTION_TYPES)}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    target = raw.get(section)
    if target is None:
        target = raw[section] = {}
    if not isinstance(target, dict):  # the error from_dict gives without the override
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(target).__name__}")
    target[key] = value
    return section, key


def _did_you_mean(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------------------------------------------
# Validation: every cross-field rule in one place


def _validate_kernel_impls(m: "ModelConfig", seq_len: int) -> None:
    """Each ``model.*_impl`` names ``auto`` or an implementation its kernel registers (whether this platform can
    run it is checked when the kernel is called)."""
    import pallas_kernels

    registries = pallas_kernels.registries()
    kernels = {"attention_impl": ("attention",), "mlp_impl": ("mlp",), "rms_norm_impl": ("rms_norm",),
               # one setting for the training loss (a weighted sum) and the per-token losses DPO and evaluation use
               "cross_entropy_impl": ("cross_entropy", "cross_entropy_sum")}
    for key, names in kernels.items():
        value = getattr(m, key)
        known = sorted({"auto", *(n for name in names for n in registries[name].names())})
        if value not in known:
            raise ConfigError(f"model.{key} must be one of {', '.join(known)}, got {value!r}"
                              f"{_did_you_mean(value, known)}")
    if m.attention_impl == "cudnn":
        from pallas_kernels.attention import cudnn

        # Against the largest head dim any card takes: this card's (128 below Hopper) is checked at the call, as
        # validation runs before the backend starts.
        reason = cudnn.supports((m.resolved_head_dim,), m.dtype, max_head_dim=256)
        if reason is None and seq_len % 2:
            reason = f"train.seq_len must be even (cuDNN's backward refuses odd lengths), not {seq_len}"
        if reason is not None:
            raise ConfigError(f"model.attention_impl=cudnn: the model's {reason}; attention_impl=auto picks an "
                              "attention that takes it")
    if m.attention_impl == "pallas":
        import jax.numpy as jnp

        if m.resolved_head_dim not in (64, 128) or jnp.dtype(m.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ConfigError(f"model.attention_impl=pallas needs head_dim 64 or 128 and dtype bfloat16 or float16, "
                              f"the model has head_dim {m.resolved_head_dim} and dtype {m.dtype}; "
                              "attention_impl=auto picks an attention that takes it")


def _validate_xla_options(options) -> None:
    """``train.xla_options`` is a mapping of option names to scalars; whether XLA knows them is checked when the
    step is built (``train.step.compiler_options``). Catches YAML's reading of ``{name:value}`` (no space after the
    colon) as a key with no value, which XLA would reject with a type error naming neither."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ConfigError(f"train.xla_options must be a mapping of XLA option names to values, got {options!r}")
    for name, value in options.items():
        if value is None:
            raise ConfigError(f"train.xla_options: {name!r} has no value (write 'name: value', with a space after "
                              "the colon)")
        if not isinstance(value, (str, bool, int, float)):
            raise ConfigError(f"train.xla_options: {name!r} must be a string, bool or number, got {value!r}")


def _validate_finite(config: Config) -> None:
    """Every float field is a finite number: NaN passes every ``<=`` range check below, and inf breaks the run
    late."""
    for section in _SECTION_TYPES:
        values = getattr(config, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")


def _validate_rope_scaling(scaling: dict | None) -> None:
    """The four Llama-3 numbers ``model.rope.inverse_frequencies`` divides by, checked here rather than failing in
    numpy at model build."""
    if scaling is None:
        return
    required = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ConfigError(f"model.rope_scaling is missing {', '.join(sorted(missing))}")
    for key in required:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"model.rope_scaling.{key} must be a positive number, got {value!r}")
    if scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise ConfigError(f"model.rope_scaling.high_freq_factor must differ from low_freq_factor (both are "
                          f"{scaling['low_freq_factor']}; RoPE divides by their difference)")


def validate(config: Config) -> None:
    """Raise ConfigError for the first rule the config breaks."""
    m, t, o, g = config.model, config.train, config.optim, config.mesh
    _validate_finite(config)
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads, "model.d_ff": m.d_ff,
        "model.max_seq_len": m.max_seq_len, "train.steps": t.steps, "train.global_batch_size": t.global_batch_size,
        "train.seq_len": t.seq_len, "train.grad_accum_steps": t.grad_accum_steps, "log.every": config.log.every,
        "train.eval_batches": t.eval_batches, "log.profile_steps": config.log.profile_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if config.log.profile_start < 0:
        raise ConfigError(f"log.profile_start must be >= 0 (0: no profile), got {config.log.profile_start}")
    if m.head_dim is not None and m.head_dim <= 0:
        raise ConfigError(f"model.head_dim must be positive or null (d_model // num_heads), got {m.head_dim}")
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ConfigError(f"model.num_heads ({m.num_heads}) must divide model.d_model ({m.d_model})")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    if m.resolved_head_dim % 2:
        raise ConfigError(f"the head dimension ({m.resolved_head_dim}) must be even for RoPE")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) is longer than model.max_seq_len ({m.max_seq_len})")
    for key, value in (("model.dtype", m.dtype), ("model.param_dtype", m.param_dtype),
                       ("optim.state_dtype", o.state_dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got {value!r}")
    _validate_xla_options(t.xla_options)
    _validate_kernel_impls(m, t.seq_len)
    if m.kernel_table is not None:
        from pallas_kernels.tuned import TableError, read

        try:
            read(m.kernel_table)
        except TableError as e:
            raise ConfigError(f"model.kernel_table: {e}") from None
    if m.remat_policy not in REMAT_POLICIES:
        raise ConfigError(
            f"model.remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {m.remat_policy!r}"
            f"{_did_you_mean(m.remat_policy, REMAT_POLICIES)}"
        )
    if m.rope_theta <= 0 or m.norm_eps <= 0:
        raise ConfigError(f"model.rope_theta and model.norm_eps must be positive, got {m.rope_theta} and "
                          f"{m.norm_eps}")
    if m.remat_policy == "names" and not m.remat_save_names:
        raise ConfigError("model.remat_policy=names needs model.remat_save_names (e.g. [attention_out, mlp_out])")
    for name in m.remat_save_names:
        if name not in ACTIVATION_NAMES:
            raise ConfigError(f"model.remat_save_names: unknown activation {name!r}; known: "
                              f"{', '.join(ACTIVATION_NAMES)}{_did_you_mean(str(name), ACTIVATION_NAMES)}")
    _validate_rope_scaling(m.rope_scaling)
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.grad_accum_steps "
            f"({t.grad_accum_steps})"
        )
    if not o.learning_rate > 0:
        raise ConfigError(f"optim.learning_rate must be positive, got {o.learning_rate}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be within [0, 1], got {o.min_lr_ratio}")
    for key in ("warmup_steps", "grad_clip", "weight_decay"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key} must not be negative, got {getattr(o, key)}")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1) or o.eps <= 0:
        raise ConfigError(f"optim.b1 and optim.b2 must be within [0, 1) and optim.eps positive, got {o.b1}, {o.b2} "
                          f"and {o.eps}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must not be negative (0: only at the end), got {t.eval_every}")
    if t.z_loss_weight < 0:
        raise ConfigError(f"train.z_loss_weight must not be negative, got {t.z_loss_weight}")
    if t.peak_tflops_per_device is not None and t.peak_tflops_per_device <= 0:
        raise ConfigError(f"train.peak_tflops_per_device must be positive or null (detect), got "
                          f"{t.peak_tflops_per_device}")
    if o.decay_steps is not None and o.decay_steps < 1:
        raise ConfigError(f"optim.decay_steps must be positive or null (until train.steps), got {o.decay_steps}")
    if not 0 <= t.seed < 2**32:  # the data loader's seed is an unsigned 32-bit integer
        raise ConfigError(f"train.seed must be within [0, 2**32 - 1], got {t.seed}")
    for key, value in (("mesh.data", g.data), ("mesh.fsdp", g.fsdp), ("mesh.tensor", g.tensor),
                       ("mesh.context", g.context)):
        if value == 0 or value < -1:
            raise ConfigError(f"{key} must be a positive size or -1 (fill), got {value}")
    if sum(v == -1 for v in (g.data, g.fsdp, g.tensor, g.context)) > 1:
        raise ConfigError("at most one mesh axis may be -1 (fill)")
    for axis in ("data", "fsdp", "tensor", "context"):
        inter, total = getattr(g, f"inter_node_{axis}"), getattr(g, axis)
        if inter == 0 or inter < -1:
            raise ConfigError(f"mesh.inter_node_{axis} must be a positive size or -1 (auto), got {inter}")
        if inter > 0 and total > 0 and total % inter:
            raise ConfigError(f"mesh.inter_node_{axis} ({inter}) must divide mesh.{axis} ({total})")
    for key, size, dim, dim_key in (
        ("mesh.tensor", g.tensor, m.num_kv_heads, "model.num_kv_heads"),
        ("mesh.tensor", g.tensor, m.num_heads, "model.num_heads"),
        ("mesh.tensor", g.tensor, m.d_ff, "model.d_ff"),
        ("mesh.tensor", g.tensor, m.vocab_size, "model.vocab_size"),
        ("mesh.fsdp", g.fsdp, m.d_model, "model.d_model"),
        ("mesh.context", g.context, t.seq_len, "train.seq_len"),
    ):
        if size > 0 and dim % size:
            raise ConfigError(f"{dim_key} ({dim}) is not divisible by {key} ({size})")
    c = config.checkpoint
    for key, value in (("checkpoint.every", c.every), ("checkpoint.keep_every", c.keep_every)):
        if value < 0:
            raise ConfigError(f"{key} must not be negative (0 disables it), got {value}")
    if c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be at least 1, got {c.keep_last}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    if t.on_spike not in ("ignore", "rollback"):
        raise ConfigError(f"train.on_spike must be ignore or rollback, got {t.on_spike!r}")
    if t.spike_factor < 0 or (t.spike_factor and t.spike_factor <= 1):
        raise ConfigError(f"train.spike_factor must be 0 (off) or greater than 1, got {t.spike_factor}")
    if t.spike_window < 1 or t.max_rollbacks < 0:
        raise ConfigError(f"train.spike_window must be positive and train.max_rollbacks not negative, got "
                          f"{t.spike_window} and {t.max_rollbacks}")
    if t.compilation_cache_max_gb is not None and not t.compilation_cache_max_gb > 0:
        raise ConfigError(f"train.compilation_cache_max_gb must be positive or null (no limit), got "
                          f"{t.compilation_cache_max_gb}")
    if not t.resume:
        raise ConfigError("train.resume must be auto, never or a checkpoint directory, got an empty string")
    config.data.validate()
    config.posttrain.validate()


def describe_options() -> str:
    """Every option with its default and help, for ``--help``."""
    lines = []
    for section, cls in _SECTION_TYPES.items():
        lines.append(f"{section}:")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name}={_as_typed(default)}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _as_typed(value) -> str:
    """A default as one would type it on the command line (YAML): null, true, a bare word, a flow mapping."""
    if isinstance(value, str) and value and "\n" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:  # e.g. a glob starting with '*', an alias to YAML
            pass
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, read from its source."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs
