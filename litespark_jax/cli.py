"""Shared command-line plumbing: ``--config`` plus dotted overrides, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from litespark_jax.config import Config, describe_options, load_config
from litespark_jax.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: ``prog: error: message (see --help)`` and exit code 2, without the
    usage block argparse prints first (10 lines for some of our commands, above the one line that matters)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, **bounds: int) -> None:
    """``parser.error`` (one line, exit 2) naming the first flag whose value is below its bound, e.g.
    ``require_at_least(parser, args, steps=1, warmup=0)``; a value of None (an unset optional flag) passes."""
    for name, bound in bounds.items():
        value = getattr(args, name)
        if value is not None and value < bound:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {bound}")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """``parser.error`` naming the first of these flags whose value is not > 0 (durations, where 0 times nothing)."""
    for name in names:
        value = getattr(args, name)
        if not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, not {value}")


def require_output_dir(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """``parser.error`` before any work when an output directory (``--out``) cannot be made or written, rather than
    a traceback once the work is done. A directory that does not exist is made and removed again (the command makes
    it when it writes), so a refused command leaves nothing behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{flag} {path}: is a file, not a directory")
    missing, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"{flag} {path}: cannot create it ({e.strerror or e})")
    writable = os.access(path, os.W_OK)
    for made in missing:  # deepest first
        os.rmdir(made)
    if not writable:
        parser.error(f"{flag} {path}: the directory is not writable")


def require_writable_file(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """``parser.error`` before any work when an output file (``--jsonl``, ``--out``...) could not be written, rather
    than a traceback after the work is done."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a directory, not a file")
    if not os.path.isdir(parent):
        parser.error(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        parser.error(f"{flag} {path}: the directory {parent} is not writable")


PRETRAINING_DEFAULT = ("e.g. configs/tiny.yaml (default: the built-in defaults listed below: a 3.4M-parameter model on "
                       "the bundled corpus, 1000 steps)")


def config_parser(prog: str, description: str, default: str = PRETRAINING_DEFAULT) -> argparse.ArgumentParser:
    """``--config`` and overrides; ``default`` names a preset and says what running without ``--config`` trains."""
    parser = ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides (section.key=value; defaults shown):\n" + describe_options(),
    )
    parser.add_argument("--config", default=None, help=f"YAML preset, {default}")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a config value")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, Config]:
    """Flags and overrides in any order (`train.steps=2 --config X.yaml` too)."""
    for arg in sys.argv[1:] if argv is None else argv:
        name = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in name and name.split(".", 1)[0].isidentifier():
            # torchtitan / MaxText habit: --section.key=value. argparse would blame every argument after it.
            parser.error(f"{arg}: overrides are written without dashes: "
                         f"{arg[2:] if '=' in arg else name + '=VALUE'}")
    args = parser.parse_intermixed_args(argv)
    return args, load_config(args.config, args.overrides)


def run_config_command(prog: str, description: str, run: Callable[[Config], object], argv=None,
                       check: Callable[[Config], None] | None = None, default: str = PRETRAINING_DEFAULT) -> int:
    """Parse ``--config`` and overrides, start jax.distributed from the environment, then ``run(config)``.

    The distributed start-up comes after parsing (bad flags fail fast, with no rendezvous) and before anything
    touches a device.
    """
    _, config = parse_config(config_parser(prog, description, default), argv)
    if check is not None:
        check(config)  # a command's own refusals, before the rendezvous
    from litespark_jax.compilation_cache import use_compilation_cache
    from litespark_jax.parallel.distributed import initialize_from_env
    from litespark_jax.parallel.watchdog import timeout_from_env

    timeout_from_env()  # a bad LITESPARK_STEP_TIMEOUT_S fails here, not after the rendezvous

    initialize_from_env()  # SLURM / JobSet / LITESPARK_COORDINATOR; no-op for one process
    use_compilation_cache(config.train.compilation_cache_dir, max_gb=config.train.compilation_cache_max_gb)
    run(config)
    return 0


# XLA's GPU client takes 75% of the card by default; a one-GPU training step that keeps its activations needs more
# (the 3B preset's step is 71 GiB on an 80 GB H100). cuBLAS/cuDNN workspaces live in the rest. An explicit setting
# (launch/env.sh uses 0.9 on clusters) wins.
GPU_MEMORY_FRACTION = "0.95"


def _show_info_logs() -> None:
    """Print this package's INFO lines (what a command did, hints such as the tokenizer to train with) on stderr.
    Its own handler, not ``logging.basicConfig``: importing orbax has absl configure the root logger at WARNING
    first, which made ``basicConfig`` a no-op and every such line silent; raising the root logger instead would
    print orbax's own INFO chatter."""
    logger = logging.getLogger("litespark_jax")
    if not any(getattr(h, "_litespark", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._litespark = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_main(main: Callable[[list[str] | None], int], argv=None) -> int:
    """Run ``main``; bad input (``UserError``, or a kernel config variable that does not parse) prints one line and
    exits 2, with no traceback; Ctrl-C outside a training loop (which saves and returns 0) prints one line and
    exits 130, as a shell reports SIGINT.

    Sets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (unless set) first; it only counts if no JAX backend exists yet, so
    modules must not touch a device at import time."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    _show_info_logs()
    try:
        _check_kernel_env()
        return main(argv)
    except KeyboardInterrupt:  # outside a training loop (which saves and returns): start-up, data, compilation
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_bad_input(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_kernel_env() -> None:
    """Parse ATTN_PALLAS_CONFIG / MLP_PALLAS_CONFIG (read only when a kernel is traced) before any work. The kernels,
    and jax with them, are imported only when such a variable is set: a bad flag or config then fails in a fraction
    of a second, not after ~2 s of imports."""
    if any(name.endswith("_PALLAS_CONFIG") and value for name, value in os.environ.items()):
        from pallas_kernels.env_config import check_all

        check_all()


def _is_bad_input(error: Exception) -> bool:
    env_config = sys.modules.get("pallas_kernels.env_config")  # loaded if a kernel config was read
    return isinstance(error, UserError) or (env_config is not None and isinstance(error, env_config.KernelConfigError))
