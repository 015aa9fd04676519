"""Checkpointing as the training loop sees it: where checkpoints go, what to resume from, when to save.

``train.resume``: ``auto`` continues from the newest good checkpoint in ``checkpoint.dir`` (a fresh run when there
is none), ``never`` always starts fresh (and refuses to mix its checkpoints into a directory that holds some), a
path restores that checkpoint directory (its newest good step) or that one step directory; new checkpoints still
go to ``checkpoint.dir``.

One history per directory: a resume that lands on a step older than others in ``checkpoint.dir`` (an explicit
earlier step, not a fallback past unreadable ones, which are moved aside) is refused, since the retrained steps
would collide with the old ones. One run per directory: a lock file held while the run trains.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import jax

from litespark_jax.checkpoint import data_position
from litespark_jax.checkpoint.manager import CheckpointManager, split_checkpoint_path
from litespark_jax.errors import CheckpointError


def checkpoint_dir(config) -> str:
    return os.path.abspath(os.path.expanduser(config.checkpoint.dir or os.path.join(config.train.run_dir,
                                                                                     "checkpoints")))


LOCK_FILE = ".litespark-train.lock"


class DirectoryLock:
    """An exclusive ``flock`` on ``DIR/.litespark-train.lock`` (process 0 only), so two runs cannot train into one
    checkpoint directory at once. The file is removed on release; a killed holder leaves it behind unlocked (the
    kernel drops the lock with the process), and the next run takes it over. File systems without locks (some
    network mounts) run unlocked."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self._file = None
        if jax.process_index() != 0:
            return
        os.makedirs(directory, exist_ok=True)
        while self._file is None:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    handle.close()  # no locking on this file system
                    return
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise CheckpointError(f"{directory} is in use by {holder}: another run is training into this "
                                      f"checkpoint.dir; wait for it to finish or set checkpoint.dir") from None
            if _same_file(handle, self.path):
                self._file = handle
            else:  # the holder released (and removed) it between our open and our lock: take the new file
                handle.close()
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            try:
                os.remove(self.path)  # while still locked, so no one else holds this file
            except OSError:
                pass
            self._file.close()  # closing drops the flock
            self._file = None


def _same_file(handle, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except OSError:
        return False


class RunCheckpoints:
    """Owns the run's ``CheckpointManager``: restore-or-init at start, periodic/final/preemption saves."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config
        self.directory = checkpoint_dir(self.config)
        self.manager = CheckpointManager(self.directory, self.config.checkpoint)
        try:
            self.lock = DirectoryLock(self.directory)
        except BaseException:
            self.manager.close()
            raise
        self.manager.remove_partial_saves()  # a killed run's unfinished writes: never restored, only disk space
        self.manager.set_aside_incomplete()  # a stray step-named directory would make that step's save fail
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
            source = split_checkpoint_path(resume, "train.resume")
        if source is None:
            return self.trainer.init_state(), None, 0
        root, step = source
        manager = self.manager if root == self.directory else CheckpointManager(root, self.config.checkpoint,
                                                                               read_only=True)
        restored = self.trainer.restore_state(manager, step)
        if manager is not self.manager:
            manager.close()
        else:
            self.manager.set_aside(restored.skipped)
        newer = [s for s in self.manager.all_steps() if s > restored.step]
        if newer:
            raise CheckpointError(
                f"resuming from {restored.path} (step {restored.step}) but {self.directory} already holds the newer "
                f"step(s) {newer}: training from there would mix two histories in one directory. Resume from the "
                f"newest (train.resume=auto), or set checkpoint.dir to a new directory for the new branch")
        self.restored_from = restored.path  # the loop says "resumed from" once the data position fits too
        return restored.state, restored.data_state, restored.step

    def should_save(self, step: int) -> bool:
        every = self.config.checkpoint.every
        return step == self.config.train.steps or bool(every and step % every == 0)

    def save(self, step: int, state, iterator=None) -> None:
        data_state = iterator.get_state() if iterator is not None and hasattr(iterator, "get_state") else None
        data_state = data_position.gather(data_state, self.trainer.row_shard)
        self.manager.save(step, state, data_state=data_state, config=self.config.to_dict(),
                          seed=self.config.train.seed, force=True)

    def preemption_reached(self, step: int) -> bool:
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def close(self) -> None:
        try:
            self.manager.close()
        finally:
            self.lock.release()
