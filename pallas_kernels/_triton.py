"""Calling raw Triton kernels from JAX: through jax-triton on a GPU, through Triton's interpreter on the CPU.

``call(kernel, *arrays, out_shape=..., grid=..., interpret=False, **constexprs)`` has ``jax_triton.triton_call``'s
contract (the output pointers follow the inputs; keyword arguments are the kernel's ``tl.constexpr`` parameters).
With ``interpret=True`` the same kernel body runs in Triton's interpreter on host copies of the arrays (torch CPU
tensors, as the interpreter needs them) inside ``jax.pure_callback``: the CPU tests check the kernels' arithmetic
and the JAX wrappers around them (custom VJPs, partial sums) with no GPU, as Pallas's interpret mode does for the
Pallas kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
import warnings

import jax
import numpy as np

from pallas_kernels._dispatch import platform


@functools.cache
def available() -> bool:
    """True where the default device is a GPU and jax-triton imports (it does not with a Triton it was not built
    for, e.g. jax-triton 0.3.1 needs triton 3.6): ``auto`` then keeps the XLA implementations."""
    if platform() != "gpu" or importlib.util.find_spec("jax_triton") is None:
        return False
    try:
        import jax_triton  # noqa: F401
    except Exception as e:  # an ImportError or a version check deep inside triton
        warnings.warn(f"jax-triton is installed but does not import ({e!r}); the Triton kernels are off")
        return False
    return True


def call(kernel, *arrays, out_shape, grid, interpret: bool = False, num_warps: int = 4, **constexprs):
    """Run ``kernel`` over ``grid`` on ``arrays`` (then pointers to fresh outputs of ``out_shape``, a sequence of
    ``jax.ShapeDtypeStruct``); returns the outputs as a tuple."""
    out_shape = tuple(out_shape)
    if interpret:
        return _interpret(kernel, arrays, out_shape, grid, constexprs)
    import jax_triton

    specialize_without_torch()
    return tuple(jax_triton.triton_call(*arrays, kernel=kernel, out_shape=out_shape, grid=grid, num_warps=num_warps,
                                        **constexprs))


@functools.cache
def specialize_without_torch() -> None:
    """Set up Triton's argument specializer with torch kept out.

    Triton 3.6's native specializer imports torch the first time it runs (to recognize torch tensors), and
    jax-triton runs it when the first Triton kernel is lowered: on a machine with torch installed that cost every
    process 4.3-4.9 s of its first lowering (H100 image, docs/PERFORMANCE.md, "Start-up time"). jax-triton passes
    plain objects with a ``data_ptr``, which the specializer handles without torch. Runs once, before the first
    lowering; a torch already imported is left alone, and torch imports normally afterwards.
    """
    if sys.modules.get("torch") is not None:
        return
    absent = object()
    before = sys.modules.get("torch", absent)
    sys.modules["torch"] = None  # `import torch` raises ImportError, which the specializer expects without torch
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        native_specialize_impl(BaseBackend, 1, False, False, False)
    except Exception:  # a Triton without it sets itself up at the first lowering, as before
        pass
    finally:
        if before is absent:
            sys.modules.pop("torch", None)
        else:
            sys.modules["torch"] = before


# Triton's interpreter patches triton.language module-wide while a kernel runs, so callbacks of several devices (a
# shard_map on a CPU mesh runs them on concurrent threads) must take turns.
_INTERPRETER_LOCK = threading.Lock()


def _interpret(kernel, arrays, out_shape, grid, constexprs):
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        # triton.jit decides at decoration time, and Triton's own tl.sum & co. are jit functions too.
        raise RuntimeError("Triton interpret mode needs TRITON_INTERPRET=1 in the environment before triton is "
                           "imported (tests/conftest.py sets it when no GPU tests are asked for)")

    def host(*host_arrays):
        import torch

        args = [_to_torch(np.asarray(a)) for a in host_arrays]
        outs = [torch.zeros(s.shape, dtype=_torch_dtype(s.dtype)) for s in out_shape]
        with _INTERPRETER_LOCK:
            kernel[grid](*args, *outs, **constexprs)
        return tuple(_from_torch(o, s.dtype) for o, s in zip(outs, out_shape))

    return tuple(jax.pure_callback(host, out_shape, *arrays))


def _torch_dtype(dtype):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
            "int32": torch.int32}[np.dtype(dtype).name]


def _to_torch(a: np.ndarray):
    import torch

    if a.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own: move the bits
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _from_torch(t, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        import torch

        return t.view(torch.int16).numpy().view(dtype)
    return t.numpy().astype(dtype, copy=False)
