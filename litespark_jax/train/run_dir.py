"""The run directory: made before anything runs, and the run's config.yaml written once the run starts training."""

from __future__ import annotations

import os

import yaml

from litespark_jax.config import Config
from litespark_jax.errors import ConfigError


def make_run_dir(config: Config) -> None:
    """Create ``train.run_dir``; a ConfigError when it cannot be a directory (a file in the way, no permission)."""
    run_dir = config.train.run_dir
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.run_dir {run_dir} cannot be used as a directory: {e.strerror or e}") from None


def record_config(config: Config) -> None:
    """Write the run's config.yaml into ``train.run_dir``, once the run is about to train.

    A config.yaml that an earlier run left and that differs from this one is kept as config.N.yaml (the lowest free
    N) rather than overwritten: a resumed run may change its config on purpose (more steps). A run that is refused
    (a checkpoint that does not fit) or has nothing to train leaves config.yaml alone, so it keeps naming the config
    that made the newest checkpoint."""
    run_dir = config.train.run_dir
    make_run_dir(config)
    path = os.path.join(run_dir, "config.yaml")
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
        n = 1
        while os.path.exists(os.path.join(run_dir, f"config.{n}.yaml")):
            n += 1
        os.replace(path, os.path.join(run_dir, f"config.{n}.yaml"))
    with open(path, "w") as f:
        f.write(text)
