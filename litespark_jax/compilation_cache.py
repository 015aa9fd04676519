"""JAX's persistent compilation cache, on by default for the command-line runs.

A restart (after a preemption, a crash, a changed eval cadence) otherwise compiles its train and eval steps again.
With the cache, a process that compiles the same program (same shapes, config, jax/XLA version and flags) loads the
executable from disk instead: the 1B preset's first step came after 14 s instead of 38 s on an H100
(docs/PERFORMANCE.md, "Start-up time"). XLA's per-fusion autotuning results are kept beside it, so even a changed
program skips most GEMM autotuning.
"""

from __future__ import annotations

import logging
import os

import jax

from litespark_jax.config import DEFAULT_COMPILATION_CACHE_DIR
from litespark_jax.errors import ConfigError

logger = logging.getLogger(__name__)


def use_compilation_cache(directory: str | None, field: str = "train.compilation_cache_dir") -> str | None:
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
    """
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
    logger.info("XLA compilation cache: %s", directory)
    return directory
