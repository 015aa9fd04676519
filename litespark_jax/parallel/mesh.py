"""The device mesh and the default logical-to-mesh sharding rules."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from litespark_jax.config import MeshConfig
from litespark_jax.errors import ConfigError
from litespark_jax.parallel.logical import logical_to_spec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameters shard their `embed` (or `vocab`) axis over fsdp and their head/MLP axes over tensor; activations
# shard the batch over data x fsdp and the sequence over context. A mesh axis is used once per array, so an
# activation's `embed` stays whole once `batch` has taken fsdp.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": "context",
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve -1 (fill) and check that the axis sizes multiply to ``num_devices``."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    for axis, value in sizes.items():
        if value == -1:
            if num_devices % known:
                raise ConfigError(f"mesh: {num_devices} devices cannot be split with fixed axes of product {known}")
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(f"mesh {shape} needs {math.prod(sizes.values())} devices but {num_devices} are present")
    return sizes


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), MESH_AXES)


def named_sharding(mesh: Mesh, axes, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of [batch, seq] input arrays."""
    return named_sharding(mesh, ("batch", "seq"), rules)
