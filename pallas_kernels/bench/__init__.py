"""Kernel benchmarks: ``python -m pallas_kernels.bench [--only attention,mlp,cross_entropy,rms_norm]``.

Each module here has ``run(args) -> list[dict]`` which times one kernel family on the current device against
its baselines (cuDNN, XLA) and returns result rows; ``__main__`` prints them as a table and optionally writes JSONL.
"""
