"""``python -m litespark_jax.train --config configs/tiny.yaml [section.key=value ...]``"""

from __future__ import annotations

import sys

from litespark_jax.cli import run_config_command, run_main


def _train(config) -> None:
    from litespark_jax.train.report import train_and_report

    train_and_report(config)


def _refuse_posttrain_settings(config) -> None:
    """A ``posttrain.*`` value would be silently ignored by pretraining: say so before anything starts."""
    import dataclasses

    from litespark_jax.errors import ConfigError
    from litespark_jax.posttrain.config import PosttrainConfig

    default = PosttrainConfig()
    for field in dataclasses.fields(default):
        if getattr(config.posttrain, field.name) != getattr(default, field.name):
            raise ConfigError(f"posttrain.{field.name} is set, but python -m litespark_jax.train pretrains and has no "
                              f"use for the posttrain section; fine-tune with python -m litespark_jax.sft or "
                              f"litespark_jax.dpo")


def main(argv=None) -> int:
    return run_config_command("python -m litespark_jax.train", "Pretrain a Llama-family model.", _train, argv,
                              check=_refuse_posttrain_settings)


if __name__ == "__main__":
    sys.exit(run_main(main))
