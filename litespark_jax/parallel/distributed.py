"""Multi-process start-up: ``jax.distributed.initialize`` from SLURM, Kubernetes JobSet or explicit variables.

One process per node drives all of that node's GPUs. ``initialize_from_env()`` reads, in order:

* explicit: ``LITESPARK_COORDINATOR`` (host:port of process 0), ``LITESPARK_NUM_PROCESSES``, ``LITESPARK_PROCESS_ID``;
* SLURM (``srun``, one task per node): ``SLURM_NTASKS``, ``SLURM_PROCID``, the first host of ``SLURM_JOB_NODELIST``
  (or ``SLURM_STEP_NODELIST``) as coordinator on port ``LITESPARK_COORDINATOR_PORT`` (default 12355);
* Kubernetes JobSet: ``JOBSET_NAME``, ``REPLICATED_JOB_NAME``, ``JOB_COMPLETION_INDEX`` and ``LITESPARK_NUM_PROCESSES``
  (the manifest sets it to the replica count); the coordinator is pod 0's stable DNS name
  ``<jobset>-<replicated job>-0-0.<jobset>``.

With none of them (or a single process) it does nothing: a one-process run needs no coordinator. The rendezvous
waits ``LITESPARK_INIT_TIMEOUT_S`` seconds (default 300, > 0) and then fails with a message naming the coordinator, the
process and what to check, instead of hanging until the scheduler's wall clock. On CPU the cross-process
collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import threading

import jax
import numpy as np

from litespark_jax.errors import UserError

log = logging.getLogger("litespark_jax")
DEFAULT_PORT = 12355


RENDEZVOUS_EXIT_CODE = 75  # EX_TEMPFAIL, as the step watchdog: the scheduler may retry


class DistributedError(UserError):
    """The processes of a multi-process run could not find each other."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    coordinator: str
    num_processes: int
    process_id: int
    source: str


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,07],gpu5`` -> [node01, node02, node03, node07, gpu5]: SLURM's compressed host list, where a
    name may also carry text after its brackets and several bracket groups (``gpu[01-02]-ib``,
    ``rack[1-2]-n[01-02]``: every combination, the first group outermost, as ``scontrol show hostnames``)."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        names = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            names = [n + text for n in names]
            if ranges:
                names = [n + value for n in names for value in _range_values(ranges)]
        hosts.extend(names)
    return hosts


def _range_values(ranges: str) -> list[str]:
    """``01-03,07`` -> [01, 02, 03, 07], keeping each bound's zero padding."""
    values = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            values.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        else:
            values.append(part)
    return values


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(RENDEZVOUS_EXIT_CODE)


def env_number(env, key: str, default: float, *, integer: bool = False, low: float = 0.0,
               high: float = math.inf, strict_low: bool = False) -> float:
    """``env[key]`` as a number within [low, high] (or (low, high] with ``strict_low``), ``default`` when unset;
    anything else is a one-line ``DistributedError`` naming the variable, not a traceback."""
    text = env.get(key)
    if text is None:
        return default
    kind = "an integer" if integer else "a number"
    bounds = f"{'>' if strict_low else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (strict_low and value == low) or value > high:
        raise DistributedError(f"environment variable {key}={text!r} must be {kind} {bounds}")
    return value


def _int(env, key) -> int:
    return int(env_number(env, key, 0, integer=True))


def detect(env=None) -> ProcessSpec | None:
    """The process layout from the environment, or None for a single-process run."""
    env = os.environ if env is None else env
    port = int(env_number(env, "LITESPARK_COORDINATOR_PORT", DEFAULT_PORT, integer=True, low=1, high=65535))
    if "LITESPARK_COORDINATOR" in env:
        missing = [k for k in ("LITESPARK_NUM_PROCESSES", "LITESPARK_PROCESS_ID") if k not in env]
        if missing:
            raise DistributedError(f"LITESPARK_COORDINATOR is set but {', '.join(missing)} is not")
        coordinator = env["LITESPARK_COORDINATOR"]
        if ":" not in coordinator:
            coordinator = f"{coordinator}:{port}"
        spec = ProcessSpec(coordinator, _int(env, "LITESPARK_NUM_PROCESSES"), _int(env, "LITESPARK_PROCESS_ID"),
                           "explicit")
    elif "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and env_number(env, "SLURM_NTASKS", 1, integer=True) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedError("SLURM_JOB_NODELIST is not set; launch the job step with srun")
        spec = ProcessSpec(f"{expand_nodelist(nodelist)[0]}:{port}", _int(env, "SLURM_NTASKS"),
                           _int(env, "SLURM_PROCID"), "slurm")
    elif "JOBSET_NAME" in env and "JOB_COMPLETION_INDEX" in env:
        if "LITESPARK_NUM_PROCESSES" not in env:
            raise DistributedError("JobSet run: set LITESPARK_NUM_PROCESSES to the number of pods (see "
                                   "launch/jobset.yaml)")
        jobset, rjob = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "workers")
        spec = ProcessSpec(f"{jobset}-{rjob}-0-0.{jobset}:{port}", _int(env, "LITESPARK_NUM_PROCESSES"),
                           _int(env, "JOB_COMPLETION_INDEX"), "jobset")
    elif env_number(env, "LITESPARK_NUM_PROCESSES", 1, integer=True) > 1:
        raise DistributedError(
            f"LITESPARK_NUM_PROCESSES={env['LITESPARK_NUM_PROCESSES']} but nothing says where process 0 is: set "
            f"LITESPARK_COORDINATOR and LITESPARK_PROCESS_ID, start the processes with srun, or (JobSet) pass "
            f"JOBSET_NAME and JOB_COMPLETION_INDEX (see launch/jobset.yaml)")
    else:
        return None
    if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(f"process id {spec.process_id} is not within 0..{spec.num_processes - 1} "
                               f"({spec.source} variables)")
    return None if spec.num_processes == 1 else spec


def initialize_from_env(env=None, timeout_s: float | None = None) -> ProcessSpec | None:
    """Join the multi-process run described by the environment (no-op for one process)."""
    env = os.environ if env is None else env
    spec = detect(env)
    if spec is None:
        return None
    if timeout_s is None:
        timeout_s = env_number(env, "LITESPARK_INIT_TIMEOUT_S", 300, strict_low=True)
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("process %d/%d joining %s (from %s variables, timeout %gs)", spec.process_id, spec.num_processes,
             spec.coordinator, spec.source, timeout_s)
    message = (
        f"process {spec.process_id} of {spec.num_processes} could not rendezvous with the coordinator "
        f"{spec.coordinator} within {timeout_s:g}s ({spec.source} variables): check that all {spec.num_processes} "
        f"processes were started, that process 0 runs on that host and the port is open between nodes "
        f"(LITESPARK_COORDINATOR_PORT); raise LITESPARK_INIT_TIMEOUT_S for slow starts."
    )
    # XLA aborts the process (a C++ CHECK, no Python exception) when its own deadline passes; our timer fires
    # first with a message that says what to check, and exits non-zero so the scheduler can retry.
    timer = threading.Timer(timeout_s, _give_up, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id, initialization_timeout=math.ceil(timeout_s) + 30)
    except Exception as e:  # noqa: BLE001 - XLA raises plain RuntimeError/XlaRuntimeError variants
        first = " ".join(str(e).split())[:300]
        raise DistributedError(f"{message} [{type(e).__name__}: {first}]") from None
    finally:
        timer.cancel()
    log.info("process %d: %d local / %d global devices", jax.process_index(), jax.local_device_count(),
             jax.device_count())
    return spec


def per_process(value: int) -> np.ndarray:
    """``value`` from every process, in process order (``[value]`` on one process): how processes that each know
    only their own count or outcome agree on one. A collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return np.asarray([value], np.int32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)
