"""JAX's persistent compilation cache, on by default for the command-line runs.

A restart (after a preemption, a crash, a changed eval cadence) otherwise compiles its train and eval steps again.
With the cache, a process that compiles the same program (same shapes, config, jax/XLA version and flags) loads the
executable from disk instead: the 1B preset's first step came after 13.6 s instead of 29.4 s on an H100
(docs/PERFORMANCE.md, "Start-up time"). XLA's per-fusion autotuning results are kept beside it, so even a changed
program skips most GEMM autotuning.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import jax
from jax._src import compilation_cache as _jax_cache
from jax._src.lru_cache import LRUCache

from litespark_jax.config import DEFAULT_COMPILATION_CACHE_DIR
from litespark_jax.errors import ConfigError

logger = logging.getLogger(__name__)


def use_compilation_cache(directory: str | None, field: str = "train.compilation_cache_dir",
                          max_gb: float | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``directory`` and return the directory in use.

    A cache directory the caller already chose (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) wins and is returned
    as it is. An empty or null ``directory`` leaves the cache off. Takes effect for compilations after the call. A
    directory that cannot be used is a ConfigError naming ``field``, except the default one: a run on a machine
    whose home directory is read-only goes on without the cache, with a warning.

    On several processes the default directory is not used. Only process 0 writes the cache, so with a home
    directory local to each host, a restarted process 0 would load its steps while the others compile theirs:
    executables built apart (and XLA's autotuning, shared between compiling processes, could wait on process 0;
    reasoned from jax's code, not reproduced).
    A directory every host shares, set explicitly, is used.

    Entries are written whole (``WholeEntryCache``), and ``max_gb`` bounds a directory chosen here (least recently
    used programs go first) unless jax's own ``jax_compilation_cache_max_size`` is set.
    """
    _jax_cache.LRUCache = WholeEntryCache  # read when jax opens the cache, at its first compilation
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    if not directory:
        return None
    is_default = directory == DEFAULT_COMPILATION_CACHE_DIR
    if is_default and jax.process_count() > 1:
        logger.info("no XLA compilation cache on several processes unless %s names a directory all hosts share",
                    field)
        return None
    directory = os.path.expanduser(directory)
    problem = None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        problem = f"cannot create it ({e.strerror or e})"
    if problem is None and not os.access(directory, os.W_OK):
        problem = "not writable"
    if problem:
        if is_default:
            logger.warning("no XLA compilation cache: the default %s is %s; set %s to a writable directory to keep "
                           "compiled steps across restarts", directory, problem, field)
            return None
        raise ConfigError(f"{field} {directory!r}: {problem} (set {field}=null to run without the cache)")
    jax.config.update("jax_compilation_cache_dir", directory)
    if max_gb is not None and jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", int(max_gb * 1e9))
    logger.info("XLA compilation cache: %s", directory)
    return directory


class WholeEntryCache(LRUCache):
    """jax's file cache, with each entry written to a temporary file and renamed into place.

    jax writes an entry in place and never writes over one that exists, so a process killed while writing left a
    truncated entry that every later start failed to read (a warning), compiled again, and could not replace. Here
    a reader sees a whole entry or none, and an entry that exists when jax writes (jax writes only after a miss or a
    failed read) is replaced, so a damaged one heals on the next start.
    """

    _STALE_TMP_S = 3600  # no entry takes an hour to write: older temporary files are from killed processes

    def __init__(self, path: str, *, max_size: int, **kwargs):
        super().__init__(path, max_size=max_size, **kwargs)
        if self._is_local:
            for tmp in self.path.glob(".*.tmp"):
                try:
                    if time.time() - os.stat(tmp).st_mtime > self._STALE_TMP_S:
                        os.unlink(tmp)
                except OSError:
                    pass  # another process cleaned it up or is writing it

    def put(self, key: str, value: bytes) -> None:
        if not self._is_local or (self.eviction_enabled and len(value) > self.max_size):
            return super().put(key, value)  # no rename on remote filesystems; jax warns about an oversized entry
        if not key:
            raise ValueError("key cannot be empty")
        entry = self.path / f"{key}-cache"
        if self.eviction_enabled:
            self.lock.acquire(timeout=self.lock_timeout_secs)
        try:
            self._evict_if_needed(additional_size=len(value))
            # A name no other writer has, even one on another host sharing the directory.
            fd, tmp = tempfile.mkstemp(dir=os.fspath(self.path), prefix=f".{key}-cache.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(value)
                os.replace(tmp, entry)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if self.eviction_enabled:
                (self.path / f"{key}-atime").write_bytes(time.time_ns().to_bytes(8, "little"))
        finally:
            if self.eviction_enabled:
                self.lock.release()
