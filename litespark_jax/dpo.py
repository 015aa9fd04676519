"""``python -m litespark_jax.dpo --config configs/dpo-tiny.yaml [section.key=value ...]``

Direct preference optimization on prompt/chosen/rejected JSONL. See docs/POSTTRAINING.md; options are the pretraining ones plus the ``posttrain:`` section.
"""

from __future__ import annotations

import sys

from litespark_jax.cli import config_parser, parse_config, run_main


def main(argv=None) -> int:
    parser = config_parser("python -m litespark_jax.dpo", "Direct preference optimization on prompt/chosen/rejected JSONL.")
    _, config = parse_config(parser, argv)
    from litespark_jax.parallel.distributed import initialize_from_env

    initialize_from_env()  # SLURM / JobSet / LITESPARK_COORDINATOR; no-op for one process
    from litespark_jax.posttrain.run import run

    run("dpo", config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
