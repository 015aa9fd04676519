"""Start N processes of one multi-process JAX run on this host (CPU devices or GPUs), like N nodes would.

    python launch/local.py --processes 2 --devices-per-process 4 -- python -m litespark_jax.train --config ...
    python launch/local.py --processes 2 --gpus -- python -m litespark_jax.train ...   # GPUs split evenly

Environment set for every process (read by ``litespark_jax.parallel.distributed.initialize_from_env``):

* ``LITESPARK_COORDINATOR=127.0.0.1:<free port>``, ``LITESPARK_NUM_PROCESSES``, ``LITESPARK_PROCESS_ID``: the
  explicit rendezvous (process 0 hosts the coordinator).
* CPU mode (default): ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` give each
  process K host devices; cross-process collectives use gloo (``jax_cpu_collectives_implementation``).
* ``--gpus``: ``CUDA_VISIBLE_DEVICES`` gives each process its own share of the GPUs (one process per "node");
  ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9`` as on the cluster.

Output of process i is prefixed ``[i]``. When one process fails the others are stopped (a real cluster's scheduler
does the same) and the launcher exits with the first failure's code (128 + N for a process killed by signal N, as
a shell reports it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, i: int, n: int, port: int, devices_per_process: int, gpus: list[str] | None) -> dict:
    env = dict(base)
    env.update(LITESPARK_COORDINATOR=f"127.0.0.1:{port}", LITESPARK_NUM_PROCESSES=str(n),
               LITESPARK_PROCESS_ID=str(i))
    if gpus is None:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    else:
        share = len(gpus) // n
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * share:(i + 1) * share])
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    return env


def _pump(stream, prefix: str):
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _raise_interrupt(signum, frame):
    raise _Terminated


def exit_code(returncode: int) -> int:
    """A child's code as a shell reports it: ``Popen`` gives -N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], processes: int, devices_per_process: int = 1, gpus: list[str] | None = None,
           timeout: float | None = None) -> int:
    port = free_port()
    procs, pumps = [], []
    for i in range(processes):
        try:
            p = subprocess.Popen(command, env=process_env(os.environ, i, processes, port, devices_per_process, gpus),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        except OSError as e:  # no such program, or not executable (process 0 finds out, before any has started)
            for started in procs:
                os.killpg(started.pid, signal.SIGKILL)
                started.wait()
            raise LaunchError(f"cannot run {command[0]!r}: {e.strerror}") from None
        t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] "), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    # SIGTERM (timeout, CI cancel, scancel) must reach the workers too: they run in their own sessions, so raise
    # here and let the cleanup below stop them, as for Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            running = [p for p in procs if p.poll() is None]  # polls every process: no failure goes unseen
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or not running:
                code = failed[0] if failed else 0
                break
            if deadline and time.monotonic() > deadline:
                code = 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=5)
        signal.signal(signal.SIGTERM, previous)
    return exit_code(code or next((p.returncode for p in procs if p.returncode), 0))


class LaunchError(Exception):
    """A launch that cannot start: reported in one line, exit code 2."""


class _OneLineErrors(argparse.ArgumentParser):
    """Errors as one line and exit code 2, without argparse's usage block, as ``litespark_jax.cli.ArgumentParser``
    gives the package's CLIs (not imported: the launcher runs from a checkout where the package is not installed)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = _OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4, help="CPU host devices per process")
    parser.add_argument("--gpus", action="store_true", help="split this host's GPUs among the processes")
    parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    for flag, value in (("--processes", args.processes), ("--devices-per-process", args.devices_per_process)):
        if value < 1:
            parser.error(f"{flag} {value}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout {args.timeout:g}: must be positive (seconds)")
    gpus = None
    if args.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            gpus = visible.split(",")
        else:
            try:
                out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
            except FileNotFoundError:
                parser.error("--gpus: nvidia-smi was not found and CUDA_VISIBLE_DEVICES is not set")
            # Whole GPUs only ("GPU 0: ..."); MIG instances are listed beneath them, indented.
            gpus = [str(i) for i in range(sum(line.startswith("GPU ") for line in out.splitlines()))]
        if not gpus:
            parser.error("--gpus: no GPU found (nvidia-smi -L lists none)")
        if len(gpus) % args.processes:
            parser.error(f"{len(gpus)} GPUs cannot be split evenly over {args.processes} processes")
    try:
        return launch(command, args.processes, args.devices_per_process, gpus, args.timeout)
    except LaunchError as e:
        parser.error(str(e))
    except KeyboardInterrupt as e:  # the workers are stopped by now
        signal_number = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        print(f"stopped by {signal.Signals(signal_number).name}; the workers were terminated", file=sys.stderr)
        return 128 + signal_number


if __name__ == "__main__":
    sys.exit(main())
