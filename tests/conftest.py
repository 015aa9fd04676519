"""Suite-wide settings: float32 matmuls on CPU, Triton kernels interpreted, and GPU tests skipped (reported as skipped)
without a GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("LITESPARK_TEST_GPU") != "1" else "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
if os.environ.get("LITESPARK_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run with LITESPARK_TEST_GPU=1 on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
