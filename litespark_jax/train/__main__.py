"""``python -m litespark_jax.train --config configs/tiny.yaml [section.key=value ...]``"""

from __future__ import annotations

import sys

from litespark_jax.cli import config_parser, parse_config, run_main


def main(argv=None) -> int:
    parser = config_parser("python -m litespark_jax.train", "Pretrain a Llama-family model.")
    _, config = parse_config(parser, argv)
    from litespark_jax.parallel.distributed import initialize_from_env

    initialize_from_env()  # SLURM / JobSet / LITESPARK_COORDINATOR; no-op for one process
    from litespark_jax.train.report import train_and_report

    train_and_report(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
