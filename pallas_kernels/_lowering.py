"""One lowering per distinct kernel call, however many call sites a program has."""

from __future__ import annotations

import functools

import jax


def lowered_once(*static_argnames: str):
    """Decorator: ``jax.jit`` with the kernel's configuration arguments static, for the function that builds and calls
    a Pallas kernel.

    JAX lowers every call site of a kernel traced inline on its own, and a Mosaic GPU kernel's lowering is ~1.2 s of
    Python: with unrolled layers, the 1B preset's train and eval steps lowered 96 kernels (6 distinct ones) in 119
    of the 167 s it took to start from a warm compilation cache (H100, docs/PERFORMANCE.md). Behind a jit boundary,
    call sites with the same shapes and configuration share one traced jaxpr, which JAX lowers once per program;
    XLA inlines the call, so the compiled step is the same.

    In interpret mode (``interpret`` set: the CPU tests) the function runs as it is, without the boundary: the GPU
    interpreter's warpgroup barriers hung once in a jitted backward kernel on 2 CPU cores.
    """

    def decorate(fn):
        jitted = jax.jit(fn, static_argnames=static_argnames)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return (fn if kwargs.get("interpret") else jitted)(*args, **kwargs)

        return call

    return decorate
