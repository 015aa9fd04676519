"""The device mesh and the default logical-to-mesh sharding rules.

Four mesh axes: ``data`` (replicated parameters, batch split), ``fsdp`` (parameters, gradients and optimizer state
split over ``embed``; the batch split too), ``tensor`` (Megatron column/row split of heads and MLP width) and
``context`` (the sequence split). Each axis has a total size (``mesh.data`` ...) and an inter-node factor
(``mesh.inter_node_data`` ...): the devices of one node (one process) form the minor, fast part of every axis and the
nodes the major, slow part, so collectives over an axis with inter-node factor 1 never leave NVLink.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from litespark_jax.config import MeshConfig
from litespark_jax.errors import ConfigError
from litespark_jax.parallel.logical import logical_to_spec

MESH_AXES = ("data", "fsdp", "tensor", "context")
# Where -1 (auto) inter-node factors go first: data-parallel all-reduces are the most latency tolerant.
_INTER_NODE_ORDER = ("data", "fsdp", "context", "tensor")

# Parameters shard their `embed` axis over fsdp and their head/MLP/vocab axes over tensor; activations shard the
# batch over data x fsdp and the sequence over context. A mesh axis is used once per array, so an activation's
# `embed` stays whole once `batch` has taken fsdp.
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
                fixed = ", ".join(f"mesh.{a}={v}" for a, v in sizes.items() if v != -1)
                raise ConfigError(f"mesh: {num_devices} devices cannot be split with {fixed} (product {known}) and "
                                  f"mesh.{axis}=-1 filling the rest")
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(f"mesh {shape} needs {math.prod(sizes.values())} devices but {num_devices} are present")
    return sizes


def inter_node_shape(cfg: MeshConfig, sizes: dict[str, int], num_nodes: int) -> dict[str, int]:
    """The inter-node factor of every axis: explicit ``inter_node_*`` values, then -1 (auto) ones filled greedily
    (data, fsdp, context, tensor) with the node count that is left, each taking what divides its total size."""
    inter = {axis: getattr(cfg, f"inter_node_{axis}", 1) for axis in MESH_AXES}
    fixed = math.prod(v for v in inter.values() if v != -1)
    if num_nodes % fixed:
        named = ", ".join(f"mesh.inter_node_{a}={v}" for a, v in inter.items() if v not in (-1, 1))
        raise ConfigError(f"mesh: {named} (product {fixed}) does not divide the {num_nodes} node(s) (processes) of "
                          "this run")
    left = num_nodes // fixed
    for axis in _INTER_NODE_ORDER:
        if inter[axis] != -1:
            continue
        take = math.gcd(left, sizes[axis])
        inter[axis], left = take, left // take
    if left != 1:
        raise ConfigError(
            f"mesh: cannot place {num_nodes} nodes on the axes {sizes}; set mesh.inter_node_* (e.g. "
            f"mesh.inter_node_data={num_nodes}) so that each divides its axis size"
        )
    for axis in MESH_AXES:
        if sizes[axis] % inter[axis]:
            raise ConfigError(f"mesh.inter_node_{axis} ({inter[axis]}) does not divide mesh.{axis} ({sizes[axis]})")
    if math.prod(inter.values()) != num_nodes:
        raise ConfigError(f"mesh: the inter_node_* sizes {inter} multiply to {math.prod(inter.values())}, "
                          f"not to the {num_nodes} nodes")
    return inter


def _nodes(devices) -> list[list]:
    """Devices grouped by node (one process per node), each group sorted by device id."""
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    groups = [sorted(g, key=lambda d: d.id) for _, g in sorted(by_process.items())]
    if len({len(g) for g in groups}) != 1:
        raise ConfigError(f"mesh: processes have different device counts {[len(g) for g in groups]}")
    return groups


def device_grid(cfg: MeshConfig, devices) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """The devices as an array of the mesh's shape, node-major on every axis; also (sizes, inter-node sizes)."""
    groups = _nodes(devices)
    sizes = mesh_shape(cfg, len(devices))
    inter = inter_node_shape(cfg, sizes, len(groups))
    intra = {a: sizes[a] // inter[a] for a in MESH_AXES}
    grid = np.empty((len(groups), len(groups[0])), dtype=object)
    for i, g in enumerate(groups):
        for j, d in enumerate(g):
            grid[i, j] = d
    n = len(MESH_AXES)
    grid = grid.reshape(*(inter[a] for a in MESH_AXES), *(intra[a] for a in MESH_AXES))
    # (inter_0..inter_3, intra_0..intra_3) -> (inter_0, intra_0, inter_1, intra_1, ...) -> axis sizes.
    grid = grid.transpose([k for i in range(n) for k in (i, n + i)])
    return grid.reshape(tuple(sizes.values())), sizes, inter


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    grid, _, _ = device_grid(cfg, devices)
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items())


def named_sharding(mesh: Mesh, axes, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of [batch, seq] input arrays."""
    return named_sharding(mesh, ("batch", "seq"), rules)


def check_shapes(config, mesh: Mesh, rules=DEFAULT_RULES) -> None:
    """Raise ConfigError naming the dimension and mesh axis when a batch or model shape does not divide the mesh."""
    sizes = dict(mesh.shape)
    m, t = config.model, config.train

    def axis_size(name):
        mesh_axes = rules.get(name)
        if mesh_axes is None:
            return 1, ()
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        return math.prod(sizes[a] for a in mesh_axes), mesh_axes

    micro_batch = t.global_batch_size // t.grad_accum_steps
    checks = [
        ("batch", micro_batch, "train.global_batch_size / train.grad_accum_steps"),
        ("seq", t.seq_len, "train.seq_len"),
        ("heads", m.num_heads, "model.num_heads"),
        ("kv_heads", m.num_kv_heads, "model.num_kv_heads"),
        ("mlp", m.d_ff, "model.d_ff"),
        ("vocab", m.vocab_size, "model.vocab_size"),
        ("embed", m.d_model, "model.d_model"),
    ]
    for logical, dim, key in checks:
        size, mesh_axes = axis_size(logical)
        if dim % size:
            names = " x ".join(f"mesh.{a} ({sizes[a]})" for a in mesh_axes)
            raise ConfigError(f"{key} ({dim}) is not divisible by {names} = {size}: the '{logical}' axis is split "
                              f"over {'x'.join(mesh_axes)}")
    # Sharded attention splits the heads over the heads' and the sequence's axes together (each device attends
    # whole sequences of its heads; parallel/kernels.py): checked here, before the run writes anything.
    head_axes = tuple(dict.fromkeys(a for name in ("heads", "seq") for a in axis_size(name)[1] if sizes[a] > 1))
    head_split = math.prod(sizes[a] for a in head_axes)
    if m.num_heads % head_split:
        names = " x ".join(f"mesh.{a} ({sizes[a]})" for a in head_axes)
        raise ConfigError(f"model.num_heads ({m.num_heads}) is not divisible by {names} = {head_split}: sharded "
                          "attention splits the heads over both")
