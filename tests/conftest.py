"""Suite-wide settings: float32 matmuls on CPU, Triton kernels interpreted, GPU tests skipped (reported as skipped)
without a GPU, XLA's CPU code generated without LLVM's optimizations, and one XLA compilation cache for the run."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("LITESPARK_TEST_GPU") != "1" else "")
# Many tests compile the same programs (the tiny model's train step, in-process and in the CLI subprocesses they
# start): one persistent compilation cache for the run lets the later ones load what an earlier one compiled
# (tests/checkpoint + tests/posttrain: 8:49 -> 5:43 on 2 cores). This process makes it before the xdist workers
# start, so they and their subprocesses inherit it; it is removed when the run ends. A cache dir set by the caller
# is used as it is and kept.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="litespark-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("LITESPARK_TEST_GPU") != "1":
    # Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The suite's programs are tiny and compiled more often than they run long: XLA's CPU backend without LLVM's
    # optimizations (jax's `jax_disable_most_optimizations`; the HLO passes, fusion and buffer assignment are
    # unchanged) cut tests/train/test_step.py from 124 to 79 s of CPU. Subprocesses inherit it. Tests that run long
    # programs opt out (marker `optimized_xla`, below).
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

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


@pytest.fixture(autouse=True)
def _optimized_xla(request, monkeypatch):
    """Tests marked ``optimized_xla`` compile with LLVM's optimizations as usual: they run their programs for long
    enough (hundreds of training steps) that -O0 code costs more than its compilation saves."""
    if request.node.get_closest_marker("optimized_xla") is None:
        yield
        return
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")  # for the subprocesses the test starts
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def pytest_sessionfinish(session):
    if _RUN_CACHE is not None:  # whichever process made it (the xdist controller, or a run without workers)
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)
