"""Process layout from SLURM / JobSet / explicit variables, and the step watchdog."""

from __future__ import annotations

import re
import time

import pytest

from litespark_jax.parallel.distributed import DistributedError, detect, expand_nodelist
from litespark_jax.parallel.watchdog import EXIT_CODE, StepWatchdog


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[01-03,07],head") == ["gpu01", "gpu02", "gpu03", "gpu07", "head"]
    assert expand_nodelist("node7") == ["node7"]
    # text after the brackets and several bracket groups: the coordinator was "gpu01", not "gpu01-ib"
    assert expand_nodelist("gpu[01-02]-ib") == ["gpu01-ib", "gpu02-ib"]
    assert expand_nodelist("rack[1-2]-n[01-02],login") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "login"]


def test_detect_slurm():
    spec = detect({"SLURM_JOB_ID": "9", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
                   "SLURM_JOB_NODELIST": "h100-[12-15]"})
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.source) == ("h100-12:12355", 4, 3, "slurm")


def test_detect_jobset():
    spec = detect({"JOBSET_NAME": "llama", "REPLICATED_JOB_NAME": "workers", "JOB_COMPLETION_INDEX": "1",
                   "LITESPARK_NUM_PROCESSES": "2", "LITESPARK_COORDINATOR_PORT": "5000"})
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("llama-workers-0-0.llama:5000", 2, 1)


def test_detect_explicit_and_single_process():
    spec = detect({"LITESPARK_COORDINATOR": "10.0.0.1:1234", "LITESPARK_NUM_PROCESSES": "2",
                   "LITESPARK_PROCESS_ID": "0"})
    assert spec.coordinator == "10.0.0.1:1234" and spec.num_processes == 2
    assert detect({}) is None
    assert detect({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    with pytest.raises(DistributedError, match="LITESPARK_PROCESS_ID"):
        detect({"LITESPARK_COORDINATOR": "x:1", "LITESPARK_NUM_PROCESSES": "2"})
    with pytest.raises(DistributedError, match="not within 0..1"):
        detect({"LITESPARK_COORDINATOR": "x:1", "LITESPARK_NUM_PROCESSES": "2", "LITESPARK_PROCESS_ID": "2"})


def test_watchdog_fires_when_steps_stop():
    codes = []
    dog = StepWatchdog(0.3, exit_fn=codes.append, poll_s=0.05)
    for _ in range(3):
        dog.beat()
        time.sleep(0.1)
    assert codes == []
    time.sleep(0.8)
    assert codes == [EXIT_CODE]


def test_watchdog_stops_and_can_be_disabled():
    codes = []
    dog = StepWatchdog(0.2, exit_fn=codes.append, poll_s=0.05)
    dog.beat()
    dog.stop()
    time.sleep(0.5)
    assert codes == []
    assert not StepWatchdog.from_env({"LITESPARK_STEP_TIMEOUT_S": "0"}).enabled


@pytest.mark.parametrize("env, message", [
    ({"LITESPARK_COORDINATOR_PORT": "abc"}, "LITESPARK_COORDINATOR_PORT='abc' must be an integer >= 1 and <= 65535"),
    ({"LITESPARK_COORDINATOR_PORT": "70000"}, "LITESPARK_COORDINATOR_PORT='70000' must be an integer"),
    ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": ""}, "SLURM_NTASKS='' must be an integer >= 0"),
    ({"JOB_COMPLETION_INDEX": "2", "LITESPARK_NUM_PROCESSES": "4"},
     "LITESPARK_NUM_PROCESSES=4 but nothing says where process 0 is"),
])
def test_bad_or_incomplete_variables_are_one_line_errors(env, message):
    with pytest.raises(DistributedError, match=re.escape(message)):
        detect(env)


@pytest.mark.parametrize("name, value, message", [
    ("LITESPARK_STEP_TIMEOUT_S", "30m", "LITESPARK_STEP_TIMEOUT_S='30m' must be a number >= 0"),
    ("LITESPARK_STEP_TIMEOUT_S", "nan", "LITESPARK_STEP_TIMEOUT_S='nan' must be a number >= 0"),
    ("LITESPARK_STEP_TIMEOUT_S", "-5", "LITESPARK_STEP_TIMEOUT_S='-5' must be a number >= 0"),
    ("LITESPARK_INIT_TIMEOUT_S", "0", "LITESPARK_INIT_TIMEOUT_S='0' must be a number > 0"),
    ("LITESPARK_INIT_TIMEOUT_S", "10m", "LITESPARK_INIT_TIMEOUT_S='10m' must be a number > 0"),
])
def test_timeouts_from_the_environment_are_checked(name, value, message):
    import subprocess
    import sys

    from tests.checkpoint.conftest import REPO, subprocess_env

    env = {**subprocess_env(), name: value, "LITESPARK_COORDINATOR": "127.0.0.1:1", "LITESPARK_NUM_PROCESSES": "2",
           "LITESPARK_PROCESS_ID": "0"}
    proc = subprocess.run([sys.executable, "-m", "litespark_jax.train", "train.steps=1"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: environment variable {message}", proc.stderr
    assert StepWatchdog.from_env({"LITESPARK_STEP_TIMEOUT_S": "90.5"}).timeout_s == 90.5
