"""``python -m litespark_jax.dpo --config configs/dpo-tiny.yaml [section.key=value ...]``

Direct preference optimization on prompt/chosen/rejected JSONL. See docs/POSTTRAINING.md; options are the pretraining ones plus the ``posttrain:`` section.
"""

from __future__ import annotations

import sys

from litespark_jax.cli import run_config_command, run_main
from litespark_jax.posttrain.config import default_run


def _run(config) -> None:
    from litespark_jax.posttrain.run import run

    run("dpo", config)


def main(argv=None) -> int:
    return run_config_command("python -m litespark_jax.dpo", "Direct preference optimization on prompt/chosen/rejected JSONL.", _run, argv,
                              default=default_run("dpo"))


if __name__ == "__main__":
    sys.exit(run_main(main))
