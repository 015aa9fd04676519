"""Logical axis names and the rules that map them onto mesh axes.

The model names the axes of every parameter and key activation (``embed``, ``heads``, ``vocab``, ``batch``...);
it never names mesh axes. A run activates a (mesh, rules) pair with ``use_rules``; until then ``constrain`` is a
no-op, so the same model code runs on one CPU device and on a sharded cluster.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Logical names used by the model. Parameters: layers, vocab, embed, heads, kv_heads, head_dim, mlp, gate_up.
# Activations: batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab.
LogicalAxes = Sequence[str | None]

_state = threading.local()


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: dict[str, str | tuple[str, ...] | None]):
    """Within this context, ``constrain`` pins activations to ``mesh`` according to ``rules``."""
    previous = getattr(_state, "active", None)
    _state.active = (mesh, dict(rules))
    try:
        yield
    finally:
        _state.active = previous


def active() -> tuple[jax.sharding.Mesh, dict] | None:
    return getattr(_state, "active", None)


def logical_to_spec(axes: LogicalAxes, rules: dict) -> PartitionSpec:
    """A PartitionSpec for logical ``axes``; a mesh axis is used at most once (later duplicates stay unsharded)."""
    used: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the active rules; identity when none are active."""
    current = active()
    if current is None:
        return x
    mesh, rules = current
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
