"""Throughput accounting and metric sinks.

``model_flops_per_token`` is the one FLOP formula used by the logs and the benchmarks alike: 6 x parameters per
token for the matmuls (forward + backward) plus causal attention, 6 x layers x d_model x seq (half of the
non-causal 12 x layers x d_model x seq that MaxText and NeMo report).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from litespark_jax.config import ModelConfig

# Dense bf16 tensor-core peak per device, TFLOP/s (the MFU denominator).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def model_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    attention = 6 * cfg.num_layers * cfg.d_model * seq_len
    return 6.0 * cfg.num_params() + (attention if causal else 2 * attention)


def peak_tflops_per_device(override: float | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (MFU is then not shown)."""
    if override is not None:
        return override
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name in kind:
            return peak
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops: float | None, num_devices: int):
    if not peak_tflops:
        return None
    return tokens_per_second * flops_per_token / (peak_tflops * 1e12 * num_devices)


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch wherever it is installed,
    only to accept torch tensors (we log floats), which cost every run's start 3.6 s on 2 CPU cores."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Writes scalar metrics to RUN_DIR/metrics.jsonl and TensorBoard (only on process 0)."""

    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, start_step: int = 0):
        """``start_step``: the step the run starts from (its checkpoint's); records an earlier attempt wrote past it
        are moved out of metrics.jsonl (see ``set_aside_records_after``), so the file holds one record per step."""
        self._enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if jsonl:
            path = os.path.join(run_dir, "metrics.jsonl")
            set_aside_records_after(path, start_step)
            self._jsonl = open(path, "a")
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            # A resumed run tells TensorBoard to hide the earlier attempt's points after its checkpoint (as
            # metrics.jsonl moves them aside): purge_step writes a restart marker at the first step it logs again.
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1 if start_step
                                     else None)

    def write(self, step: int, metrics: dict) -> None:
        if not self._enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def set_aside_records_after(path: str, step: int) -> int:
    """Move the records of ``path`` (JSONL with a "step" each) past ``step``, and any unreadable line (a write cut
    off by a kill), to ``<name>.superseded.jsonl`` beside it; returns how many moved. Those steps were trained by an
    attempt that did not reach its next checkpoint; the resumed run writes them again."""
    if not os.path.isfile(path):
        return 0
    kept, moved = [], []
    with open(path) as f:
        for line in f:
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                record_step = None
            (kept if isinstance(record_step, (int, float)) and record_step <= step else moved).append(line)
    if not moved:
        return 0
    superseded = path[: -len(".jsonl")] + ".superseded.jsonl" if path.endswith(".jsonl") else path + ".superseded"
    with open(superseded, "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.writelines(kept)
    os.replace(temporary, path)
    print(f"{path}: moved {len(moved)} record(s) past step {step} (from an attempt that did not reach its next "
          f"checkpoint) to {superseded}", flush=True)
    return len(moved)
