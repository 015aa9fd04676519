"""One lowering per distinct kernel call, however many call sites a program has."""

from __future__ import annotations

import functools

import jax


def lowered_once(*static_argnames: str):
    """``jax.jit`` with the kernel's configuration arguments static, for the function that builds and calls a Pallas
    kernel.

    JAX lowers every call site of a kernel traced inline on its own, and a Mosaic GPU kernel's lowering is ~1.2 s of
    Python: with unrolled layers, the 1B preset's train and eval steps lowered 96 kernels (6 distinct ones) in 119
    of the 167 s it took to start from a warm compilation cache (H100, docs/PERFORMANCE.md). Behind a jit boundary,
    call sites with the same shapes and configuration share one traced jaxpr, which JAX lowers once per program;
    XLA inlines the call, so the compiled step is the same.
    """
    return functools.partial(jax.jit, static_argnames=static_argnames)
