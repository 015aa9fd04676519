"""Every supported mesh gives the 1-device loss and gradients (8 CPU host devices, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from litespark_jax.config import Config, MeshConfig, ModelConfig, TrainConfig, load_config
from litespark_jax.errors import ConfigError
from litespark_jax.parallel.mesh import check_shapes, device_grid, inter_node_shape, mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = ["8x1x1x1", "1x8x1x1", "2x4x1x1", "1x2x4x1", "2x1x2x2", "1x4x1x2", "1x1x2x4", "1x2x2x2"]


def run_worker(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel", script), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _number_problems(row) -> list[str]:
    """What differs from the 1-device run on this mesh beyond float32 reordering (the loss, every gradient, and the
    kernel wrappers against the plain kernels)."""
    checks = {"loss": abs(row["loss"] - row["ref_loss"]) < 1e-5 * abs(row["ref_loss"]),
              "gradients": row["max_grad_rel_err"] < 1e-4}
    checks.update({name: row[f"{name}_wrapper_err"] < 1e-5 for name in ("attention", "norm", "mlp", "loss")})
    return [f"{row['mesh']}: {name}" for name, ok in checks.items() if not ok]


def _sharding_problems(row) -> list[str]:
    """Each device holds about 1 / (fsdp x tensor) of the parameters, and as much of the gradients."""
    _, fsdp, tensor, _ = (int(x) for x in row["mesh"].split("x"))
    split = fsdp * tensor
    per_device, total = row["param_bytes_per_device"], row["param_bytes_total"]
    problems = []
    # Norm scales shard over fsdp only and stay small: allow 2% slack above total / (fsdp x tensor).
    if per_device > total / split * 1.02 + 4096 or (split > 1 and per_device >= total / split * 1.3):
        problems.append(f"{row['mesh']}: {per_device} parameter bytes per device of {total}")
    if row["grad_bytes_per_device"] != per_device:
        problems.append(f"{row['mesh']}: {row['grad_bytes_per_device']} gradient bytes per device, not {per_device}")
    return problems


def test_every_mesh_matches_one_device_and_shards_its_parameters():
    """One mesh-worker subprocess for all meshes (a fixture shared by per-mesh tests would run once per xdist
    worker); every mesh's problems are reported together, each naming its mesh."""
    proc = run_worker("mesh_worker.py", *MESHES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [row["mesh"] for row in rows] == MESHES
    problems = [p for row in rows for p in _number_problems(row) + _sharding_problems(row)]
    assert not problems, problems


def test_row_kernels_run_per_device_only_where_every_split_is_over_rows():
    from litespark_jax.parallel.kernels import _row_axes

    rules = {"batch": ("data", "fsdp"), "seq": "context"}
    mesh = lambda **axes: SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, "context": 1, **axes})  # noqa
    x = np.zeros((2, 4, 8))
    assert _row_axes(mesh(data=2, fsdp=4), rules, x) == (("data", "fsdp"), ())
    assert _row_axes(mesh(fsdp=2, context=4), rules, x) == (("fsdp",), ("context",))
    assert _row_axes(mesh(data=2, tensor=2), rules, x) is None  # tensor splits heads / f, not rows
    assert _row_axes(mesh(data=2), rules, np.zeros((8, 16))) is None  # not [batch, seq, ...]


def test_shard_map_specs_name_every_one_device_axis():
    """A shard_map input that leaves out a mesh axis has its gradient summed over it in the backward: a no-op
    all-reduce on a one-device axis, so those are named (on the first dimension); an axis of several devices that
    the spec leaves out stays out (a replicated weight's data-parallel gradient sum)."""
    from jax.sharding import PartitionSpec as P

    from litespark_jax.parallel.kernels import _spec_over_every_axis

    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 1, "context": 4})
    assert _spec_over_every_axis(["data", "context", None], mesh) == P(("data", "fsdp", "tensor"), "context", None)
    assert _spec_over_every_axis([None, None], mesh) == P(("fsdp", "tensor"), None)


def _fake_devices(processes: int, per_process: int):
    return [SimpleNamespace(id=p * per_process + i, process_index=p) for p in range(processes)
            for i in range(per_process)]


def test_inter_node_axes_are_node_major():
    # 4 nodes x 8 devices: data spans 2 nodes, fsdp 2 nodes x 4 devices, tensor 2 devices inside a node.
    cfg = MeshConfig(data=2, fsdp=8, tensor=2, context=1, inter_node_data=2, inter_node_fsdp=2)
    grid, sizes, inter = device_grid(cfg, _fake_devices(4, 8))
    assert grid.shape == (2, 8, 2, 1) and inter == {"data": 2, "fsdp": 2, "tensor": 1, "context": 1}
    nodes = np.vectorize(lambda d: d.process_index)(grid)
    # Within a node: a tensor group never crosses nodes; the fsdp axis crosses nodes every 4 devices.
    assert (nodes[:, :, 0, 0] == nodes[:, :, 1, 0]).all()
    assert [len(set(nodes[0, i * 4:(i + 1) * 4, 0, 0])) for i in range(2)] == [1, 1]


def test_auto_inter_node_prefers_data_then_fsdp():
    sizes = mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 32)
    assert inter_node_shape(MeshConfig(data=2, fsdp=-1, tensor=2), sizes, 4) == {
        "data": 2, "fsdp": 2, "tensor": 1, "context": 1}


def test_indivisible_shapes_name_the_axis():
    model = ModelConfig(num_heads=8, num_kv_heads=2)
    config = Config(model=model, train=TrainConfig(global_batch_size=8, seq_len=64),
                    mesh=MeshConfig(data=1, fsdp=1, tensor=4, context=1))
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 4, "context": 1})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        check_shapes(config, mesh)
    with pytest.raises(ConfigError, match=r"model.num_kv_heads \(2\) is not divisible by mesh.tensor \(4\)"):
        load_config(None, ["model.num_kv_heads=2", "mesh.tensor=4"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        check_shapes(Config(train=TrainConfig(global_batch_size=6)),
                     SimpleNamespace(shape={"data": 4, "fsdp": 1, "tensor": 1, "context": 1}))


def test_fsdp_all_gathers_happen_inside_the_layer_scan():
    proc = run_worker("hlo_worker.py", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    # The forward and the (rematerialized) backward scans gather their layer's weights in the loop body.
    assert row["loop_bodies"] >= 2 and row["all_gather_in_loops"] > 0
    # The norm and MLP kernels in shard_map: each layer's two norm scales and two MLP weights (and the final norm)
    # leave reduce-scattered, and no more all-reduces than with XLA's partitioner (none over one-device axes).
    mapped, xla = row["row_kernels_in_shard_map"], row["row_kernels_to_xla"]
    assert mapped["reduce-scatter"] >= 4 * row["layers"] + 1
    assert mapped["all-reduce"] <= xla["all-reduce"]

