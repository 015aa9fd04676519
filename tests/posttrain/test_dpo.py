"""DPO: the loss and its gradient against an independent implementation of the published formulas, and a short run
on the bundled pairs that raises reward accuracy above 0.9 and the chosen-rejected margin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from litespark_jax.data.tokenizers import ByteTokenizer
from litespark_jax.posttrain import dpo_data
from litespark_jax.posttrain.dpo_loss import dpo_sums, pair_losses, token_logps
from litespark_jax.posttrain.template import TemplateTokens, get_template
from litespark_jax.train.state import init_model
from tests.posttrain.conftest import tiny_config

SEQ = 64
PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin, I think."},
    {"prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "2+2"}], "chosen": "4",
     "rejected": "5"},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "no thanks, I would rather not"},
    {"prompt": "Color of the sky?", "chosen": "Blue.", "rejected": "Green."},
]


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config(SEQ).model
    graphdef, policy = init_model(cfg, seed=0)
    _, reference = init_model(cfg, seed=1)  # a different reference, so the rewards are not all zero
    return graphdef, policy, reference


@pytest.fixture
def batch(jsonl, models):
    graphdef, _, reference = models
    tt = TemplateTokens(get_template("llama3"), ByteTokenizer())
    pairs, _ = dpo_data.prepare_dpo(jsonl(PAIRS), tt, SEQ, "error")
    b = next(iter(dpo_data.dpo_dataset(pairs, pairs_per_batch=len(pairs), seed=0, repeat=False)))
    b = {k: jnp.asarray(v) for k, v in b.items()}
    b["ref_logps"] = token_logps(reference, graphdef, b, impl="reference")
    return b


def independent_sequence_logps(params, graphdef, b):
    """log pi(y|x) from the full logits (the model's __call__ and log_softmax, no loss kernel)."""
    from flax import nnx

    logits = nnx.merge(graphdef, params)(b["inputs"], b["positions"], b["segment_ids"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), b["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(logp * b["loss_mask"], axis=-1)


def independent_loss(params, reference, graphdef, b, beta, eps, loss_type):
    """Rafailov et al. 2023 eq. 7 (with conservative label smoothing), Azar et al. 2023 eq. 17, written out."""
    pi = independent_sequence_logps(params, graphdef, b)
    ref = independent_sequence_logps(reference, graphdef, b)
    pi_w, pi_l, ref_w, ref_l = pi[0::2], pi[1::2], ref[0::2], ref[1::2]
    h = (pi_w - ref_w) - (pi_l - ref_l)
    if loss_type == "ipo":
        return jnp.mean((h - 1 / (2 * beta)) ** 2)
    sigmoid = lambda z: 1 / (1 + jnp.exp(-z))  # noqa: E731
    return jnp.mean(-(1 - eps) * jnp.log(sigmoid(beta * h)) - eps * jnp.log(sigmoid(-beta * h)))


@pytest.mark.parametrize("beta, eps, loss_type", [(0.1, 0.0, "sigmoid"), (0.5, 0.2, "sigmoid"), (0.1, 0.0, "ipo")])
def test_loss_and_gradient_match_independent_formula(models, batch, beta, eps, loss_type):
    graphdef, policy, reference = models

    def ours(p):
        loss_sum, stats = dpo_sums(p, graphdef, batch, beta=beta, label_smoothing=eps, loss_type=loss_type,
                                   impl="reference")
        return loss_sum / stats["pairs"]

    loss, grad = jax.value_and_grad(ours)(policy)
    want, want_grad = jax.value_and_grad(independent_loss)(policy, reference, graphdef, batch, beta, eps, loss_type)
    assert abs(float(want)) > 1e-3
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        a, b = np.asarray(a), np.asarray(b)  # float32 sums in another order: tolerance relative to the leaf's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_rewards_and_metrics(models, batch):
    graphdef, policy, reference = models
    _, stats = dpo_sums(policy, graphdef, batch, beta=0.1, label_smoothing=0.0, loss_type="sigmoid", impl="reference")
    pi = independent_sequence_logps(policy, graphdef, batch)
    ref = independent_sequence_logps(reference, graphdef, batch)
    r_w, r_l = 0.1 * (pi[0::2] - ref[0::2]), 0.1 * (pi[1::2] - ref[1::2])
    assert stats["pairs"] == 4
    np.testing.assert_allclose(stats["reward_accuracy"], np.sum(r_w > r_l))
    np.testing.assert_allclose(stats["reward_margin"], np.sum(r_w - r_l), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["kl_proxy"], np.sum(pi - ref) / 2, rtol=1e-4, atol=1e-4)  # per-sequence mean, summed over pairs


def test_numbers_of_the_formula():
    """Hand-checked values: at h = 0 the sigmoid loss is log 2 and IPO is 1/(4 beta^2)."""
    zeros = jnp.zeros(4)
    losses, _, _ = pair_losses(zeros, zeros, beta=0.1)
    np.testing.assert_allclose(losses, np.log(2.0), rtol=1e-6)
    losses, _, _ = pair_losses(zeros, zeros, beta=0.1, loss_type="ipo")
    np.testing.assert_allclose(losses, 25.0, rtol=1e-6)
    policy = jnp.asarray([-1.0, -3.0])  # chosen -1, rejected -3, reference 0: h = 2
    losses, r_w, r_l = pair_losses(policy, jnp.zeros(2), beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(losses, [0.9 * np.log1p(np.exp(-1.0)) + 0.1 * np.log1p(np.exp(1.0))], rtol=1e-6)
    np.testing.assert_allclose([r_w[0], r_l[0]], [-0.5, -1.5])


def test_padding_pairs_count_for_nothing(models, batch):
    graphdef, policy, _ = models
    padded = {k: jnp.concatenate([v, jnp.zeros((2, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    a = dpo_sums(policy, graphdef, batch, beta=0.1, label_smoothing=0.0, loss_type="sigmoid", impl="reference")
    b = dpo_sums(policy, graphdef, padded, beta=0.1, label_smoothing=0.0, loss_type="sigmoid", impl="reference")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert b[1]["pairs"] == 4


def test_gradient_accumulation_equals_one_big_batch(models, batch):
    import optax

    from litespark_jax.posttrain.dpo_loss import make_dpo_step
    from litespark_jax.train.state import TrainState

    graphdef, policy, _ = models
    cfg = tiny_config(SEQ, posttrain={"beta": 0.2})
    optimizer = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=policy, opt_state=optimizer.init(policy))
    outs = [make_dpo_step(cfg.posttrain, cfg.model, accum, graphdef, optimizer)(state, batch) for accum in (1, 2)]
    for key in ("loss", "reward_accuracy", "reward_margin", "kl_proxy", "pairs", "grad_norm"):
        np.testing.assert_allclose(outs[0][1][key], outs[1][1][key], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(outs[0][0].params), jax.tree.leaves(outs[1][0].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _run_config(tmp_path, n_pairs, steps, seq_len=128, d_model=64, batch=32, **posttrain):
    from litespark_jax.posttrain.trainer import EXAMPLES_DIR
    from tests.posttrain.conftest import write_jsonl

    lines = open(EXAMPLES_DIR / "dpo_train.jsonl").read().splitlines()[:n_pairs]
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    run = tmp_path / f"run-{posttrain.get('reference', 'precomputed')}"
    return tiny_config(seq_len, model={"d_model": d_model, "d_ff": 2 * d_model},
                       train={"steps": steps, "global_batch_size": batch, "run_dir": str(run)},
                       optim={"learning_rate": 3e-3, "warmup_steps": 5},
                       posttrain={"train_file": path, "eval_file": path, "beta": 0.1, **posttrain},
                       checkpoint={"every": 0})


@pytest.mark.slow
@pytest.mark.optimized_xla
def test_short_run_on_bundled_pairs_raises_reward_accuracy(tmp_path):
    from litespark_jax.posttrain.trainer import DPOTrainer
    from litespark_jax.train.loop import train

    cfg = _run_config(tmp_path, 32, 40)
    trainer = DPOTrainer(cfg)
    before = trainer.evaluate_pairs(trainer.initial_params(), trainer.pairs)
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0  # policy == reference
    result = train(cfg, trainer=trainer)
    after = trainer.evaluate_pairs(result.state.params, trainer.pairs)
    print(f"DPO before {before}\nafter {after}")
    assert after["reward_accuracy"] > 0.9
    assert after["reward_margin"] > 1.0 and after["chosen_reward"] > after["rejected_reward"]
    assert {"reward_accuracy", "reward_margin", "kl_proxy", "chosen_reward", "rejected_reward"} <= set(
        result.history[-1])


def test_frozen_reference_model_equals_precomputed_log_probs(tmp_path):
    from litespark_jax.posttrain.trainer import DPOTrainer
    from litespark_jax.train.loop import train

    histories = {}
    for reference in ("precomputed", "model"):
        cfg = _run_config(tmp_path, 8, 2, seq_len=64, d_model=32, batch=8, reference=reference)
        histories[reference] = train(cfg, trainer=DPOTrainer(cfg)).history
    for a, b in zip(histories["precomputed"], histories["model"]):
        for key in ("loss", "reward_margin", "kl_proxy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_periodic_eval_logs_the_reward_metrics_with_the_loss(tmp_path):
    """The docs said evaluation writes DPO's reward metrics; only eval_loss reached metrics.jsonl."""
    import dataclasses
    import json

    from litespark_jax.posttrain.trainer import DPOTrainer
    from litespark_jax.train.loop import train

    cfg = _run_config(tmp_path, 8, 2, seq_len=64, d_model=32, batch=8)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=2, eval_batches=1))
    trainer = DPOTrainer(cfg)
    result = train(cfg, trainer=trainer)
    expected = trainer.evaluate_pairs(result.state.params, max_batches=1)
    with open(tmp_path / "run-precomputed" / "metrics.jsonl") as f:
        logged = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert [r["step"] for r in logged] == [2]
    assert result.eval_history[-1] == {k: v for k, v in logged[0].items() if k != "time"}
    for name in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl_proxy"):
        np.testing.assert_allclose(logged[0][f"eval_{name}"], expected[name], rtol=1e-6)
    np.testing.assert_allclose(logged[0]["eval_loss"], expected["loss"], rtol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_precast_layer_gradients_step_like_float32_gradients(batch, accum):
    """With ``cast_weights_once`` the DPO step differentiates the bf16 layer matrices (as the train step does) and,
    with micro-batches, accumulates their gradients in float32: one SGD step (lr 1) moves every parameter by the
    float32 parameters' gradient of the mean loss."""
    import dataclasses

    import optax

    from litespark_jax.posttrain.dpo_loss import make_dpo_step
    from litespark_jax.train.state import TrainState
    from litespark_jax.train.step import split_micro_batches

    cfg = tiny_config(SEQ, posttrain={"beta": 0.2})
    model = dataclasses.replace(cfg.model, dtype="bfloat16", cast_weights_once=True)
    graphdef, policy = init_model(model, seed=0)
    kwargs = dict(beta=0.2, label_smoothing=cfg.posttrain.label_smoothing, loss_type=cfg.posttrain.loss_type,
                  impl=model.cross_entropy_impl)
    grad_fn = jax.value_and_grad(lambda p, b: dpo_sums(p, graphdef, b, **kwargs), has_aux=True)
    micro = split_micro_batches(batch, accum)  # the float32 parameters' gradient of each micro-batch, summed
    parts = [grad_fn(policy, jax.tree.map(lambda x, i=i: x[i], micro)) for i in range(accum)]
    want = jax.tree.map(lambda *gs: sum(gs[1:], gs[0]), *[g for _, g in parts])
    stats = {"pairs": sum(float(s["pairs"]) for (_, s), _ in parts)}
    optimizer = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=policy, opt_state=optimizer.init(policy))
    new_state, _ = make_dpo_step(cfg.posttrain, model, accum, graphdef, optimizer)(state, batch)
    for old, new, g in zip(jax.tree.leaves(policy), jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
        assert new.dtype == jnp.float32
        step, expected = np.asarray(old - new), np.asarray(g) / stats["pairs"]
        # old - new cancels in float32 (~6e-8 absolute for the norm scales, ~1.0). Under accumulation's scan the
        # output head's bf16 product (not precast: it is no layer matrix) rounds differently for a rare element (2
        # of its 8704); gradients summed in bf16 instead of float32 would be off in about half of every layer matrix.
        off = np.abs(step - expected) > 2e-7 + 1e-5 * np.abs(expected)
        assert np.mean(off) <= (0.0 if accum == 1 else 1e-3)


def test_offloaded_moments_train_like_moments_on_the_device(tmp_path):
    """``optim.offload_state`` streams the moments through the device (train.offload); DPO's step takes that path."""
    import dataclasses

    from litespark_jax.posttrain.trainer import DPOTrainer
    from litespark_jax.train.loop import train
    from litespark_jax.train.offload import StreamedOffloadStep

    histories = {}
    for offload in (False, True):
        (tmp_path / str(offload)).mkdir()
        cfg = _run_config(tmp_path / str(offload), 8, 3, seq_len=64, d_model=32, batch=8)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, offload_state=offload))
        trainer = DPOTrainer(cfg)
        assert isinstance(trainer._train_step, StreamedOffloadStep) == offload
        histories[offload] = train(cfg, trainer=trainer).history
    assert len(histories[True]) == len(histories[False]) == 3
    for a, b in zip(histories[True], histories[False]):
        for key in ("loss", "grad_norm", "reward_margin", "kl_proxy"):  # float32 rounding of differences of ~1
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
