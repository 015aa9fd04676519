"""SFT numerics: packed == unpacked (per-example losses and the gradient), and prompt tokens train nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from litespark_jax.data.tokenizers import ByteTokenizer
from litespark_jax.posttrain import sft_data
from litespark_jax.posttrain.template import TemplateTokens, get_template
from litespark_jax.train.state import init_model
from litespark_jax.train.step import token_loss_sum
from tests.posttrain.conftest import tiny_config

SEQ = 128
ROWS = [
    {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"},
                  {"role": "assistant", "content": "hi!"}]},
    {"prompt": "2+2", "completion": "four"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "dd"}]},
    {"prompt": "x" * 9, "completion": "y" * 5},
    {"prompt": "long " * 4, "completion": "answer " * 3},
]


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(SEQ).model
    graphdef, params = init_model(cfg, seed=0)
    return graphdef, params


@pytest.fixture
def examples(jsonl):
    tt = TemplateTokens(get_template("llama3"), ByteTokenizer())
    examples, _ = sft_data.prepare_sft(jsonl(ROWS), tt, SEQ, "error")
    return examples


def per_token_losses(graphdef, params, batch):
    from flax import nnx

    import pallas_kernels

    model = nnx.merge(graphdef, params)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    hidden = model.hidden_states(b["inputs"], b["positions"], b["segment_ids"])
    return np.asarray(pallas_kernels.cross_entropy(hidden, model.output_weight(), b["targets"], impl="reference")
                      * b["loss_mask"])


def stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def mean_loss_and_grad(graphdef, params, batch):
    def f(p):
        total, count = token_loss_sum(p, graphdef, {k: jnp.asarray(v) for k, v in batch.items()}, z_loss_weight=0.0,
                                      impl="reference")
        return total / count

    return jax.value_and_grad(f)(params)


def test_packed_equals_unpacked(model, examples):
    graphdef, params = model
    packed = list(sft_data.sft_dataset(examples, seq_len=SEQ, batch_size=len(examples), seed=0, repeat=False))
    assert len(packed) == 1
    packed = packed[0]
    unpacked = stack([sft_data.pad_example(e, SEQ) for e in examples])
    assert packed["inputs"].shape[0] < len(examples)  # really packed: fewer rows than conversations

    # Per-example loss sums, keyed by the example's tokens.
    by_example_unpacked = {}
    losses = per_token_losses(graphdef, params, unpacked)
    for e, row in zip(examples, losses):
        by_example_unpacked[tuple(e["inputs"])] = row.sum()
    by_example_packed = {}
    losses = per_token_losses(graphdef, params, packed)
    for r in range(packed["inputs"].shape[0]):
        seg = packed["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = seg == s
            by_example_packed[tuple(packed["inputs"][r][idx])] = losses[r][idx].sum()
    assert by_example_packed.keys() == by_example_unpacked.keys()
    for key, value in by_example_unpacked.items():
        np.testing.assert_allclose(by_example_packed[key], value, rtol=1e-5, atol=1e-6)

    loss_p, grad_p = mean_loss_and_grad(graphdef, params, packed)
    loss_u, grad_u = mean_loss_and_grad(graphdef, params, unpacked)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_prompt_tokens_contribute_nothing(model, examples):
    """Perturbing every non-assistant target (system, user, headers, padding) leaves loss and gradient bitwise
    equal; perturbing one assistant target changes both."""
    graphdef, params = model
    batch = next(iter(sft_data.sft_dataset(examples, seq_len=SEQ, batch_size=len(examples), seed=0, repeat=False)))
    rng = np.random.default_rng(0)
    perturbed = dict(batch)
    noise = rng.integers(0, 262, size=batch["targets"].shape).astype(np.int32)
    perturbed["targets"] = np.where(batch["loss_mask"] == 1, batch["targets"], noise)
    assert (perturbed["targets"] != batch["targets"]).sum() > 50
    loss, grad = mean_loss_and_grad(graphdef, params, batch)
    loss2, grad2 = mean_loss_and_grad(graphdef, params, perturbed)
    assert float(loss) == float(loss2)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    control = dict(batch)
    r, c = np.argwhere(batch["loss_mask"] == 1)[0]
    control["targets"] = batch["targets"].copy()
    control["targets"][r, c] = (batch["targets"][r, c] + 1) % 256
    loss3, _ = mean_loss_and_grad(graphdef, params, control)
    assert float(loss3) != float(loss)


def test_loss_mask_is_exactly_the_assistant_content(examples):
    """The trained targets decode to the assistant turns (plus their end-of-turn tokens), nothing else."""
    eot = 261
    answers = []
    for e in examples:
        trained = e["targets"][e["loss_mask"] == 1]
        answers.append(bytes(t for t in trained if t < 256).decode())
        assert list(trained).count(eot) == sum(1 for _ in filter(lambda t: t == eot, trained))
    assert answers == ["hi!", "four", "bdd", "yyyyy", "answer answer answer "]
