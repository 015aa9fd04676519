"""``python -m litespark_jax.train --config configs/tiny.yaml [section.key=value ...]``"""

from __future__ import annotations

import sys

from litespark_jax.cli import run_config_command, run_main


def _train(config) -> None:
    from litespark_jax.train.report import train_and_report

    train_and_report(config)


def main(argv=None) -> int:
    return run_config_command("python -m litespark_jax.train", "Pretrain a Llama-family model.", _train, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
