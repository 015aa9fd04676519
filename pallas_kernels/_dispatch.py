"""Choosing an implementation for a kernel call.

Each kernel registers its implementations by name. ``impl="auto"`` asks the kernel's own chooser, which sees the
platform and the shapes; every other name must be registered and available on the current platform. The CPU
always gets the pure-JAX reference, so tests and laptops run the same model code as the GPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax

REFERENCE = "reference"


def platform() -> str:
    """The default backend's platform name ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


@functools.cache
def is_hopper() -> bool:
    """True when the default device is an NVIDIA Hopper GPU (compute capability 9.x)."""
    if platform() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "")
    return str(capability).startswith("9")


_recorders: list[list] = []


@contextlib.contextmanager
def record_calls():
    """Collect ``(kernel, impl, shape_info)`` of every kernel call resolved inside (e.g. while tracing a step with
    ``jax.eval_shape``): the calls ``python -m litespark_jax.autotune`` times."""
    calls: list = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


class Registry:
    """The implementations of one kernel, by name, and the rule that picks one for ``impl="auto"``."""

    def __init__(self, kernel: str, auto: Callable[..., str]):
        self.kernel = kernel
        self._auto = auto
        self._impls: dict[str, tuple[Callable, Callable[[], bool]]] = {}
        self._needs: dict[str, str] = {}

    def register(self, name: str, available: Callable[[], bool] = lambda: True, needs: str = ""):
        """Register ``fn`` as ``name``; ``available`` says whether it runs here, ``needs`` what it runs on (for the
        error when a user forces it where it does not)."""
        def decorator(fn):
            self._impls[name] = (fn, available)
            if needs:
                self._needs[name] = needs
            return fn

        return decorator

    def rule(self, **shape_info) -> str:
        """What the built-in ``auto`` rule picks for this call (no tuned table)."""
        return self._auto(**shape_info)

    def names(self) -> list[str]:
        return sorted(self._impls)

    def available(self, name: str) -> bool:
        return name in self._impls and self._impls[name][1]()

    def resolve(self, impl: str, **shape_info) -> tuple[str, Callable]:
        """The (name, function) that ``impl`` means here; raises ValueError for unknown or unavailable names.

        ``auto`` takes the tuned table's choice for this exact call when one is loaded (``pallas_kernels.tuned``)
        and available here, else the kernel's rule."""
        for calls in _recorders:
            calls.append((self.kernel, impl, dict(shape_info)))
        name = impl
        if impl == "auto":
            from pallas_kernels import tuned

            name = tuned.tuned_choice(self.kernel, shape_info)
            if name is None or not self.available(name):
                name = self.rule(**shape_info)
        if name not in self._impls:
            raise ValueError(
                f"{self.kernel}: unknown impl {impl!r}; choose one of {['auto', *self.names()]}"
            )
        fn, available = self._impls[name]
        if not available():
            needs = f" (it needs {self._needs[name]})" if name in self._needs else ""
            raise ValueError(f"{self.kernel}: impl {name!r} is not available on platform {platform()!r}{needs}; "
                             f"impl='auto' picks one that is")
        return name, fn
