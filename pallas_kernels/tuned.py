"""A tuned dispatch table: which implementation ``impl="auto"`` uses for an exact kernel call, measured on a card.

``python -m litespark_jax.autotune`` writes the table (JSON) by timing every available implementation of every
kernel call a model makes; ``use_table(path)`` (or ``model.kernel_table`` in a LiteSpark config) makes ``auto``
consult it before its built-in rule. An entry applies only on the device kind it was measured on and only to the
exact call (kernel, shapes, dtype, flags); anything else falls back to the rule, so a table can never pick an
implementation for a call it did not time.

Format::

    {"version": 1, "device_kind": "NVIDIA H100 80GB HBM3", "jax": "0.11.2",
     "entries": [{"kernel": "mlp", "call": {"x_shape": [6, 4096, 3072], ...}, "best": "mosaic_gpu",
                  "ms": {"fused": 12.6, "mosaic_gpu": 11.7}}]}
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

VERSION = 1
_table: dict[tuple[str, str], str] = {}


class TableError(ValueError):
    """A tuned table that cannot be used: unreadable, not this format, or unknown kernels/implementations."""


def call_key(shape_info: dict) -> str:
    """A canonical string for a call's shape information (tuples as lists, dtypes by name)."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        try:
            return np.dtype(v).name
        except TypeError:
            return str(v)

    return json.dumps({k: plain(v) for k, v in shape_info.items()}, sort_keys=True)


def device_kind() -> str:
    return jax.devices()[0].device_kind


def read(path: str) -> dict:
    """The table at ``path``, checked; raises TableError naming the file and what is wrong."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise TableError(f"{path}: cannot read the kernel table ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), list):
        raise TableError(f"{path}: not a version-{VERSION} kernel table (write one with python -m "
                         "litespark_jax.autotune)")
    from pallas_kernels import registries

    for i, e in enumerate(data["entries"]):
        if not (isinstance(e, dict) and {"kernel", "call", "best"} <= set(e)):
            raise TableError(f"{path}: entry {i} needs kernel, call and best")
        if not (isinstance(e["kernel"], str) and isinstance(e["best"], str) and isinstance(e["call"], dict)):
            raise TableError(f"{path}: entry {i}: kernel and best must be strings and call an object, got "
                             f"kernel {e['kernel']!r}, best {e['best']!r}, call {e['call']!r}")
        reg = registries().get(e["kernel"])
        if reg is None:
            raise TableError(f"{path}: entry {i}: unknown kernel {e['kernel']!r}; known: {sorted(registries())}")
        if e["best"] not in reg.names():
            raise TableError(f"{path}: entry {i}: {e['kernel']} has no implementation {e['best']!r}; "
                             f"choose one of {reg.names()}")
    return data


def use_table(path: str | None) -> int:
    """Make ``auto`` consult the table at ``path`` (None: stop). Returns how many entries apply on this device;
    a table measured on another device kind applies to nothing, and says so on stderr."""
    _table.clear()
    if path is None:
        return 0
    data = read(path)
    if data.get("device_kind") != device_kind():
        print(f"warning: {path} was tuned on {data.get('device_kind')!r}, this is {device_kind()!r}: not used",
              file=sys.stderr)
        return 0
    for e in data["entries"]:
        _table[(e["kernel"], call_key(e["call"]))] = e["best"]
    return len(_table)


def tuned_choice(kernel: str, shape_info: dict) -> str | None:
    """The table's implementation for this exact call on this device, or None."""
    if not _table:
        return None
    return _table.get((kernel, call_key(shape_info)))
