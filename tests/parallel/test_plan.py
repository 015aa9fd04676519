"""The planner: memory within 10% of XLA's compiled figure (8 CPU host devices, in a subprocess), and its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from litespark_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rows():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel", "plan_worker.py")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_memory_within_ten_percent_of_xla(rows):
    for r in rows:  # shown with pytest -s
        print(f"{r['case']:<20} {r['mesh']:<9} predicted {r['predicted'] / 2**20:9.1f} MiB  XLA {r['xla'] / 2**20:9.1f} MiB"
              f"  {100 * r['error']:+5.1f}%")
    assert len(rows) >= 12
    bad = [(r["case"], r["mesh"], round(100 * r["error"], 1)) for r in rows if abs(r["error"]) > 0.10]
    assert not bad, bad


def _cli(*args) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "litespark_jax.plan", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_3b_on_one_h100_fits():
    out = _cli("--config", "configs/llama-3.2-3b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "h100")
    assert "recommended: mesh.data=1 mesh.fsdp=1 mesh.tensor=1 mesh.context=1" in out
    assert "fits" in out


def test_30b_on_four_h200_nodes_recommends_a_fitting_mesh():
    out = _cli("--config", "configs/llama-30b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h200")
    assert "recommended:" in out and "DOES NOT FIT" not in out.split("recommended:")[1]


def test_param_shards_match_the_model():
    from litespark_jax.config import ModelConfig

    cfg = ModelConfig()
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    sharded, _, total = plan.param_shard_bytes(cfg, sizes)
    assert total == cfg.num_params() and sharded == 4 * total


def test_names_policy_that_keeps_every_matmul_output_plans_no_recompute():
    import dataclasses

    from litespark_jax.config import load_config

    config = load_config("configs/llama-3.2-3b.yaml")
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    inter = dict.fromkeys(sizes, 1)

    def flops(**model):
        cfg = dataclasses.replace(config.model, **model)
        return plan.plan_mesh(cfg, config.train, plan.GPUS["h100"], sizes, inter, 1).flops_per_device

    assert set(config.model.remat_save_names) >= plan.NO_RECOMPUTE_NAMES
    assert flops() == flops(remat_policy="none")
    older = ("attention_in", "query", "key", "value", "attention_out", "mlp_in")
    assert flops(remat_save_names=older) > flops()
    assert flops(remat_policy="full") > flops(remat_save_names=older)
