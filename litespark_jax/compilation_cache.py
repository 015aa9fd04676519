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

from litespark_jax.errors import ConfigError

logger = logging.getLogger(__name__)


def use_compilation_cache(directory: str | None, field: str = "train.compilation_cache_dir") -> str | None:
    """Point JAX's persistent compilation cache at ``directory`` and return the directory in use.

    A cache directory the caller already chose (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) wins and is returned
    as it is. An empty or null ``directory`` leaves the cache off. Takes effect for compilations after the call; an
    unusable directory is a ConfigError naming ``field``.
    """
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    if not directory:
        return None
    directory = os.path.expanduser(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{field} {directory!r}: cannot create it ({e.strerror or e})") from None
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"{field} {directory!r}: not writable (set {field}=null to run without the cache)")
    jax.config.update("jax_compilation_cache_dir", directory)
    logger.info("XLA compilation cache: %s", directory)
    return directory
