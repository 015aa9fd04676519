"""The ``posttrain:`` YAML section shared by SFT and DPO (fields a run does not use are ignored by it).

Kept free of imports from the rest of the package but leaf modules: ``litespark_jax.config`` imports it.
"""

from __future__ import annotations

import dataclasses

from litespark_jax.paths import expand_home

TEMPLATES = ("llama3", "chatml")
TRUNCATION = ("truncate", "drop", "error")
LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE = ("model", "precomputed")


def default_run(kind: str) -> str:
    """What ``python -m litespark_jax.<kind> --help`` says of running without ``--config`` (``kind``: sft or dpo)."""
    data = "SFT examples" if kind == "sft" else "DPO pairs"
    return (f"e.g. configs/{kind}-tiny.yaml (default: the built-in defaults listed below: a 3.4M-parameter model "
            f"from a random init on the bundled {data}, posttrain.init_from and posttrain.train_file being null)")


@dataclasses.dataclass(frozen=True)
class PosttrainConfig:
    """Supervised fine-tuning and DPO: data, chat template, window handling, starting weights and the DPO loss."""

    train_file: str | None = None
    """JSONL training data; null means the bundled example for the run (posttrain/examples/sft_train.jsonl or
    dpo_train.jsonl)."""
    eval_file: str | None = None
    """JSONL evaluation data; null means the bundled example's eval split when train_file is null, else the
    evaluations run on the train file (and say so)."""
    init_from: str | None = None
    """Starting weights: a LiteSpark checkpoint directory (or one step directory of it), a Hugging Face directory
    (config.json + *.safetensors), or null for a random init (tests, benchmarks)."""
    template: str = "llama3"
    """Chat template: llama3 (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>) or chatml
    (<|im_start|>role ... <|im_end|>). Special tokens missing from the tokenizer get ids after its vocabulary."""
    system_prompt: str | None = None
    """A system message put before conversations that have none (null: none added)."""
    truncation: str = "truncate"
    """An example longer than train.seq_len + 1 tokens: truncate (SFT keeps its first tokens; DPO keeps the end of
    the prompt, at least half the window when the prompt is that long, and cuts the ends of both responses), drop
    (skip it) or error. Truncated and dropped examples are counted and reported."""
    pack: bool = True
    """SFT: pack several conversations into each train.seq_len window (segment ids keep them apart). False pads
    one conversation per row (same losses, more padding)."""
    packing_bins: int = 16
    """SFT: windows filled at once by first-fit packing (more bins, less padding)."""
    beta: float = 0.1
    """DPO: strength of the KL regularization (temperature of the implicit reward beta * log pi/pi_ref)."""
    label_smoothing: float = 0.0
    """DPO (sigmoid loss): assumed probability that a preference label is flipped (conservative DPO), in [0, 0.5)."""
    loss_type: str = "sigmoid"
    """DPO: sigmoid (Rafailov et al. 2023) or ipo (Azar et al. 2023: (h - 1/(2 beta))^2 on the log-ratio margin)."""
    reference: str = "precomputed"
    """DPO: precomputed (reference log-probs of every pair in one pass before training; no reference weights kept)
    or model (a frozen copy of the initial weights runs beside the policy every step)."""

    def __post_init__(self):
        for name in ("train_file", "eval_file", "init_from"):
            expand_home(self, name)

    def validate(self) -> None:
        from litespark_jax.errors import ConfigError

        for key, value, choices in (("template", self.template, TEMPLATES),
                                    ("truncation", self.truncation, TRUNCATION),
                                    ("loss_type", self.loss_type, LOSS_TYPES),
                                    ("reference", self.reference, REFERENCE)):
            if value not in choices:
                raise ConfigError(f"posttrain.{key} must be one of {', '.join(choices)}, got {value!r}")
        if self.beta <= 0:
            raise ConfigError(f"posttrain.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"posttrain.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"posttrain.label_smoothing ({self.label_smoothing}) applies to the sigmoid loss only; "
                              f"posttrain.loss_type={self.loss_type} would ignore it (set it to 0)")
        if self.packing_bins < 1:
            raise ConfigError(f"posttrain.packing_bins must be at least 1, got {self.packing_bins}")
