"""The LiteSpark step learns what the baseline step learns: same seed, same data, loss curves within bf16 noise."""

import numpy as np

from litespark_jax.bench import baseline_overrides
from litespark_jax.config import load_config
from litespark_jax.train.loop import train

COMMON = [
    "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
    "model.vocab_size=384", "model.dtype=bfloat16", "train.seq_len=128", "train.global_batch_size=4",
    "train.steps=60", "train.eval_every=0", "train.eval_batches=2", "log.every=5", "log.progress_bar=false",
    "log.tensorboard=false", "optim.warmup_steps=10", "optim.learning_rate=3e-3", "checkpoint.every=0",
]
# Every fused implementation forced on (on CPU `auto` would pick some of them only for large shapes).
LITESPARK = [
    "model.cross_entropy_impl=single_pass", "model.mlp_impl=fused", "model.rms_norm_impl=fused",
    "model.remat_policy=names",
    "model.remat_save_names=[query,key,value,attention_out,residual_mid,mlp_gate_up]",
    "optim.state_dtype=bfloat16",
]


def losses(tmp_path, name, overrides):
    config = load_config("configs/tiny.yaml", [*COMMON, f"train.run_dir={tmp_path / name}", *overrides])
    return np.array([h["loss"] for h in train(config).history])


def test_litespark_and_baseline_loss_curves_agree(tmp_path):
    baseline = losses(tmp_path, "baseline", baseline_overrides())
    litespark = losses(tmp_path, "litespark", LITESPARK)
    assert baseline[-1] < baseline[0] - 1.0  # it learned something
    assert abs(litespark[-1] - baseline[-1]) <= 0.02, (baseline, litespark)
    assert np.max(np.abs(litespark - baseline)) <= 0.05, (baseline, litespark)
