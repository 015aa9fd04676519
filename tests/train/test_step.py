"""The pure train step: gradient accumulation, determinism, loss masking, and a falling loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from litespark_jax.config import Config, ModelConfig, OptimConfig, TrainConfig
from litespark_jax.train.optimizer import build_optimizer, weight_decay_mask
from litespark_jax.train.state import init_model, init_train_state
from litespark_jax.train.step import make_train_step

MODEL = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=32)


def config(**train):
    return Config(model=MODEL, optim=OptimConfig(warmup_steps=2, learning_rate=1e-2),
                  train=TrainConfig(steps=10, global_batch_size=8, seq_len=16, **train))


def random_batch(seed, batch=8, seq=16, vocab=61):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[:, seq // 2:] = 2  # two documents per row
    positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(batch, 0)
    loss_mask = (rng.random((batch, seq)) > 0.2).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions.astype(np.int32), "loss_mask": loss_mask}


def run_steps(cfg, batches):
    optimizer = build_optimizer(cfg.optim, cfg.train.steps)
    graphdef, _ = init_model(cfg.model, cfg.train.seed)
    state = init_train_state(cfg.model, optimizer, cfg.train.seed)
    step = jax.jit(make_train_step(cfg, graphdef, optimizer))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_gradient_accumulation_equals_one_large_batch():
    batches = [random_batch(i) for i in range(3)]
    state_1, losses_1 = run_steps(config(), batches)
    state_4, losses_4 = run_steps(config(grad_accum_steps=4), batches)
    np.testing.assert_allclose(losses_1, losses_4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "single_pass"])
def test_every_loss_kernel_trains_like_the_reference(impl):
    """The fused losses (``single_pass`` forms its gradients in the forward, also under accumulation's scan) give the
    reference's losses and parameters over three steps."""
    batches = [random_batch(i) for i in range(3)]
    with_impl = lambda impl, **train: dataclasses.replace(  # noqa: E731
        config(**train), model=dataclasses.replace(MODEL, cross_entropy_impl=impl))
    state_ref, losses_ref = run_steps(with_impl("reference"), batches)
    for accum in (1, 4):
        state, losses = run_steps(with_impl(impl, grad_accum_steps=accum), batches)
        np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_ref.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_same_seed_gives_same_losses_and_other_seed_does_not():
    batches = [random_batch(i) for i in range(3)]
    _, a = run_steps(config(seed=3), batches)
    _, b = run_steps(config(seed=3), batches)
    _, c = run_steps(config(seed=4), batches)
    assert a == b
    assert a != c


def test_loss_is_masked_mean_of_token_nll():
    cfg = config()
    graphdef, params = init_model(cfg.model, 0)
    batch = random_batch(7)
    from flax import nnx

    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    _, losses = run_steps(dataclasses.replace(cfg, optim=OptimConfig(learning_rate=1e-9, warmup_steps=0)), [batch])
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)


def test_loss_falls_when_fitting_one_batch():
    batch = random_batch(0)
    _, losses = run_steps(config(), [batch] * 10)
    assert losses[-1] < losses[0] - 0.5


def test_no_weight_decay_on_norms():
    cfg = config()
    _, params = init_model(cfg.model, 0)
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(m for k, m in flat.items() if "norm" in k)
    assert all(m for k, m in flat.items() if "norm" not in k)


def test_bfloat16_adam_moments_track_float32_adam():
    batches = [random_batch(i) for i in range(4)]
    cfg = config()
    lowp = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, state_dtype="bfloat16"))
    state_32, losses_32 = run_steps(cfg, batches)
    state_16, losses_16 = run_steps(lowp, batches)
    moments = [x for x in jax.tree.leaves(state_16.opt_state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    np.testing.assert_allclose(losses_16, losses_32, rtol=2e-3)


def test_optimizer_is_adamw():
    """Our chain equals optax.adamw on the same gradients (float32 moments)."""
    import optax

    cfg = config().optim
    params = {"w": jnp.ones((3, 4)), "norm": {"scale": jnp.ones((4,))}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), params)
    ours = build_optimizer(cfg, 10)
    theirs = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(
        learning_rate=lambda s: ours_lr(s), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=weight_decay_mask))
    from litespark_jax.train.optimizer import learning_rate_schedule
    ours_lr = learning_rate_schedule(cfg, 10)
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = theirs.update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gradients_of_the_precast_layer_matrices_are_the_float32_parameters_gradients(scan_layers):
    """With ``cast_weights_once`` the step differentiates the layer matrices already in bf16 (``differentiable_params``):
    their gradients come out in bf16 and, upcast, are bitwise the gradients of the float32 parameters through the
    model's own cast; every other leaf (embedding, norm scales, output head) keeps its float32 gradient."""
    from litespark_jax.train.step import differentiable_params, token_loss_sum

    model = dataclasses.replace(MODEL, dtype="bfloat16", cast_weights_once=True, scan_layers=scan_layers,
                                tie_embeddings=True)
    graphdef, params = init_model(model, 0)
    batch = random_batch(0)
    loss = lambda p: token_loss_sum(p, graphdef, batch, z_loss_weight=1e-4, impl="reference")[0]  # noqa: E731
    want = jax.jit(jax.grad(loss))(params)
    precast = differentiable_params(params, model)
    got = jax.jit(jax.grad(loss))(precast)
    dtypes = {jax.tree_util.keystr(path): g.dtype for path, g in jax.tree_util.tree_leaves_with_path(got)}
    assert {k for k, d in dtypes.items() if d == jnp.bfloat16} == {
        k for k in dtypes if k.startswith("['layers']") and "norm" not in k}
    assert len([d for d in dtypes.values() if d == jnp.bfloat16]) == 6  # wq, wk, wv, wo, w_gate_up, w_down
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert w.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w))
    assert differentiable_params(params, dataclasses.replace(model, cast_weights_once=False)) is params

