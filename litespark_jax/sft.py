"""``python -m litespark_jax.sft --config configs/sft-tiny.yaml [section.key=value ...]``

Supervised fine-tuning on chat JSONL (loss on assistant tokens only, packed). See docs/POSTTRAINING.md; options are the pretraining ones plus the ``posttrain:`` section.
"""

from __future__ import annotations

import sys

from litespark_jax.cli import run_config_command, run_main
from litespark_jax.posttrain.config import default_run


def _run(config) -> None:
    from litespark_jax.posttrain.run import run

    run("sft", config)


def main(argv=None) -> int:
    return run_config_command("python -m litespark_jax.sft", "Supervised fine-tuning on chat JSONL (loss on assistant tokens only, packed).", _run, argv,
                              default=default_run("sft"))


if __name__ == "__main__":
    sys.exit(run_main(main))
