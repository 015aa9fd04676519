"""Checkpointing as the training loop sees it: where checkpoints go, what to resume from, when to save.

``train.resume``: ``auto`` continues from the newest good checkpoint in ``checkpoint.dir`` (a fresh run when there
is none), ``never`` always starts fresh (and refuses to mix its checkpoints into a directory that holds some), a
path restores that checkpoint directory (its newest good step) or that one step directory; new checkpoints still
go to ``checkpoint.dir``.
"""

from __future__ import annotations

import os

import jax

from litespark_jax.checkpoint.manager import CheckpointManager, split_checkpoint_path
from litespark_jax.errors import CheckpointError


def checkpoint_dir(config) -> str:
    return os.path.abspath(config.checkpoint.dir or os.path.join(config.train.run_dir, "checkpoints"))


class RunCheckpoints:
    """Owns the run's ``CheckpointManager``: restore-or-init at start, periodic/final/preemption saves."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config
        self.directory = checkpoint_dir(self.config)
        self.manager = CheckpointManager(self.directory, self.config.checkpoint)
        self.restored_from: str | None = None

    def restore_or_init(self):
        """(state, data-iterator state or None, step) from ``train.resume``."""
        resume = self.config.train.resume
        source: tuple[str, int | None] | None = None
        if resume == "never":
            if self.manager.all_steps():
                raise CheckpointError(
                    f"train.resume=never but {self.directory} already holds checkpoints {self.manager.all_steps()}; "
                    f"set checkpoint.dir to a new directory, delete them, or use train.resume=auto")
        elif resume == "auto":
            if self.manager.all_steps():
                source = (self.directory, None)
        else:
            source = split_checkpoint_path(resume)
        if source is None:
            return self.trainer.init_state(), None, 0
        root, step = source
        manager = self.manager if root == self.directory else CheckpointManager(root, self.config.checkpoint,
                                                                               read_only=True)
        restored = self.trainer.restore_state(manager, step)
        if manager is not self.manager:
            manager.close()
        self.restored_from = restored.path
        if jax.process_index() == 0:
            print(f"resumed from {restored.path} (step {restored.step})", flush=True)
        return restored.state, restored.data_state, restored.step

    def should_save(self, step: int) -> bool:
        every = self.config.checkpoint.every
        return step == self.config.train.steps or bool(every and step % every == 0)

    def save(self, step: int, state, iterator=None) -> None:
        data_state = iterator.get_state() if iterator is not None and hasattr(iterator, "get_state") else None
        self.manager.save(step, state, data_state=data_state, config=self.config.to_dict(),
                          seed=self.config.train.seed, force=True)

    def preemption_reached(self, step: int) -> bool:
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()
