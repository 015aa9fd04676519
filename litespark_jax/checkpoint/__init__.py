"""Checkpoints: orbax save/restore of the training state (``manager``), preemption signals (``preemption``) and the
save benchmark (``bench``). Hugging Face import/export lives in ``litespark_jax.convert``."""

from litespark_jax.checkpoint.manager import (
    CheckpointManager,
    Restored,
    abstract_with_shardings,
    finalized_steps,
    split_checkpoint_path,
)
from litespark_jax.checkpoint.preemption import PreemptionHandler

__all__ = ["CheckpointManager", "PreemptionHandler", "Restored", "abstract_with_shardings", "finalized_steps",
           "split_checkpoint_path"]
