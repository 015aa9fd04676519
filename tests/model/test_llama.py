"""The Llama model against independent references: transformers, direct formulas, and itself reshaped."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from litespark_jax.config import ModelConfig
from litespark_jax.hf import hf_config, to_hf_state_dict
from litespark_jax.model import Llama
from litespark_jax.model.rope import apply_rope, inverse_frequencies
from pallas_kernels.attention import reference as attention_reference

SMALL = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, d_ff=96, max_seq_len=64)
CONFIGS = {
    "mha-untied": ModelConfig(**SMALL, num_kv_heads=4, tie_embeddings=False),
    "gqa-tied": ModelConfig(**SMALL, num_kv_heads=2, tie_embeddings=True),
    "mqa-llama3-rope": ModelConfig(
        **SMALL, num_kv_heads=1, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
}


def make_model(cfg, seed=0):
    return Llama(cfg, rngs=nnx.Rngs(params=seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = CONFIGS[name]
    model = make_model(cfg, seed=1)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg))).eval()
    state = to_hf_state_dict(nnx.to_pure_dict(nnx.state(model)), cfg)
    missing, unexpected = hf_model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24))
    ours = np.asarray(model(jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-5, rel


def _numpy_attention(q, k, v, causal=True):
    """float64 softmax attention with explicitly repeated KV heads (MHA form)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_gqa_equals_mha_with_repeated_kv():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 16, 8, 32)).astype(np.float32)
    k = rng.normal(size=(2, 16, 2, 32)).astype(np.float32)
    v = rng.normal(size=(2, 16, 2, 32)).astype(np.float32)
    gqa = attention_reference.attention(q, k, v)
    mha = attention_reference.attention(q, np.repeat(k, 4, axis=2), np.repeat(v, 4, axis=2))
    np.testing.assert_allclose(gqa, mha, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gqa, _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_model_is_causal():
    cfg = CONFIGS["gqa-tied"]
    model = make_model(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 20))
    changed = tokens.copy()
    changed[0, 12:] = (changed[0, 12:] + 1) % cfg.vocab_size
    a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :12]), np.asarray(b[:, :12]))
    assert not np.allclose(a[:, 12:], b[:, 12:])


def test_segments_do_not_attend_across_documents():
    cfg = CONFIGS["gqa-tied"]
    model = make_model(cfg)
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, cfg.vocab_size, 10), rng.integers(0, cfg.vocab_size, 6)
    packed = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 10 + [2] * 6])
    positions = np.array([list(range(10)) + list(range(6))])
    packed_logits = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
    alone_b = model(jnp.asarray(doc_b[None]))
    np.testing.assert_allclose(packed_logits[0, 10:], alone_b[0], rtol=1e-5, atol=1e-5)


def test_rope_matches_direct_rotation_formula():
    head_dim, theta = 8, 10000.0
    x = np.random.default_rng(3).normal(size=(1, 5, 2, head_dim))
    positions = np.array([[0, 1, 2, 7, 30]])
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), inverse_frequencies(head_dim, theta)))
    half = head_dim // 2
    expected = np.empty_like(x)
    for s, pos in enumerate(positions[0]):
        for i in range(half):
            angle = pos * theta ** (-2 * i / head_dim)
            c, sn = np.cos(angle), np.sin(angle)
            a, b = x[0, s, :, i], x[0, s, :, i + half]
            expected[0, s, :, i] = a * c - b * sn
            expected[0, s, :, i + half] = b * c + a * sn
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    plain = inverse_frequencies(128, 500000.0)
    scaled = inverse_frequencies(128, 500000.0, scaling)
    wavelen = 2 * np.pi / plain
    np.testing.assert_allclose(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8.0)


def test_scan_and_unrolled_layers_are_identical():
    cfg = CONFIGS["gqa-tied"]
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 16)))
    scanned = make_model(cfg)
    unrolled = make_model(dataclasses.replace(cfg, scan_layers=False))
    # Same parameters, same math; XLA may fuse the unrolled graph differently, so allow float32 rounding only.
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(unrolled(tokens)), rtol=1e-6, atol=1e-6)


def test_unrolled_layers_have_the_scanned_gradients_without_padded_copies():
    """The unrolled stack (the 3B/1B presets: faster on an H100) must train exactly like the scan, and its parameter
    gradients must be assembled by one concatenate per leaf: indexing the stacked weights made each layer's gradient a
    zero-padded full-depth array (a pad per leaf per layer, summed), which on a GPU is depth x the weights' traffic."""
    cfg = dataclasses.replace(CONFIGS["gqa-tied"], num_layers=3)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 16)))

    def loss_and_grads(c):
        graphdef, params = nnx.split(make_model(c), nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
        return jax.jit(jax.value_and_grad(loss)), params

    scan_fn, params = loss_and_grads(cfg)
    unroll_fn, unroll_params = loss_and_grads(dataclasses.replace(cfg, scan_layers=False))
    (l1, g1), (l2, g2) = scan_fn(params), unroll_fn(unroll_params)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    hlo = unroll_fn.lower(unroll_params).compile().as_text()
    assert " pad(" not in hlo


@pytest.mark.parametrize("scan", [True, False])
def test_casting_weights_once_changes_no_number(scan):
    """Layers cast their float32 weights to bf16 where they use them; casting the stack once before the layers
    (the 3B preset) must give bitwise the same loss (on the CPU), and the same gradients, back in the parameters'
    float32, up to one bf16 rounding: a weight gradient is a bf16 matmul output, and where its widening to float32
    follows the matmul directly (the cast inside the layer) XLA may fold the rounding away."""
    cfg = dataclasses.replace(CONFIGS["gqa-tied"], num_layers=3, dtype="bfloat16", scan_layers=scan,
                              remat_policy="full")
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 16)))

    def loss_and_grads(c):
        graphdef, params = nnx.split(make_model(c), nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens).astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (l1, g1), (l2, g2) = loss_and_grads(cfg), loss_and_grads(dataclasses.replace(cfg, cast_weights_once=True))
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2.0**-8, atol=0)


@pytest.mark.parametrize("policy", ["full", "save_matmuls", "save_attention"])
def test_remat_policies_change_memory_not_numbers(policy):
    cfg = CONFIGS["gqa-tied"]
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 16)))

    def grads(c):
        graphdef, params = nnx.split(make_model(c))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
        return jax.grad(loss)(params)

    base, remat = grads(cfg), grads(dataclasses.replace(cfg, remat_policy=policy))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


NO_RECOMPUTE_NAMES = ("query", "key", "value", "attention_out", "residual_mid", "mlp_gate_up")


def _grad_jaxpr_dots(cfg, tokens):
    graphdef, params = nnx.split(make_model(cfg))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general")


def test_saving_the_matmul_outputs_by_name_recomputes_no_matmul():
    """remat_policy=names with q/k/v, the attention output, the mid residual and the MLP pre-activation needs no
    layer matmul in the backward beyond the gradients themselves (the norms, RoPE and SiLU are recomputed, they are
    elementwise); counted as dot_generals in the gradient's jaxpr."""
    cfg = dataclasses.replace(CONFIGS["gqa-tied"], mlp_impl="fused")
    tokens = jnp.zeros((2, 16), jnp.int32)
    none = _grad_jaxpr_dots(cfg, tokens)
    named = _grad_jaxpr_dots(dataclasses.replace(cfg, remat_policy="names", remat_save_names=NO_RECOMPUTE_NAMES),
                             tokens)
    older = _grad_jaxpr_dots(dataclasses.replace(
        cfg, remat_policy="names",
        remat_save_names=("attention_in", "query", "key", "value", "attention_out", "mlp_in")), tokens)
    full = _grad_jaxpr_dots(dataclasses.replace(cfg, remat_policy="full"), tokens)
    # One dot more than no remat: the CPU reference attention has no custom VJP, so its QK^T scores are rebuilt
    # (the GPU kernels name their residuals: tests/kernels/test_attention_remat.py). The older choice also redoes
    # the gate/up matmul (and its custom VJP's forward around it).
    assert named == none + 1
    assert named + 2 <= older < full


@pytest.mark.parametrize("mlp_impl", ["reference", "fused"])
def test_no_recompute_names_policy_keeps_the_gradients(mlp_impl):
    cfg = dataclasses.replace(CONFIGS["gqa-tied"], mlp_impl=mlp_impl)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 16)))

    def grads(c):
        graphdef, params = nnx.split(make_model(c))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
        return jax.grad(loss)(params)

    base = grads(cfg)
    named = grads(dataclasses.replace(cfg, remat_policy="names", remat_save_names=NO_RECOMPUTE_NAMES))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(named)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axes, want", [({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, "auto"),
                                        ({"data": 2, "fsdp": 2, "tensor": 2, "context": 1}, "fused")])
def test_row_kernels_fall_back_to_xla_where_rows_are_not_the_whole_split(monkeypatch, axes, want):
    """Without a mesh (or on one device) the model's norm and MLP ask for ``auto``; under a mesh whose tensor axis
    splits the work, a per-device kernel over rows would not be the whole computation, so they ask for the XLA
    ``fused`` implementations, which the partitioner splits. (Data, FSDP and context meshes run the kernels in
    ``shard_map``: tests/parallel/test_meshes.py checks those against one device.)"""
    import types

    from litespark_jax.model import layers
    from litespark_jax.parallel import kernels
    from pallas_kernels.mlp import reference as mlp_reference
    from pallas_kernels.rms_norm import reference as norm_reference

    asked = []
    record = lambda impl, value: asked.append(impl) or value  # noqa: E731
    monkeypatch.setattr(kernels.pallas_kernels, "mlp", lambda x, wgu, wd, impl: record(
        impl, mlp_reference.mlp(x, wgu, wd)))
    monkeypatch.setattr(kernels.pallas_kernels, "rms_norm", lambda x, s, eps, impl: record(
        impl, norm_reference.rms_norm(x, s, eps=eps)))
    monkeypatch.setattr(kernels.pallas_kernels, "rms_norm_and_skip", lambda x, s, eps, impl: record(
        impl, (norm_reference.rms_norm(x, s, eps=eps), x)))
    mesh = types.SimpleNamespace(shape=axes, size=int(np.prod(list(axes.values()))))
    from litespark_jax.parallel.mesh import DEFAULT_RULES

    monkeypatch.setattr(kernels, "active", lambda: (mesh, DEFAULT_RULES))
    cfg = CONFIGS["gqa-tied"]
    x = jnp.ones((2, 4, cfg.d_model))
    layers.MLP(cfg, rngs=nnx.Rngs(0))(x)
    norm = layers.RMSNorm(cfg.d_model, cfg)
    norm(x)
    norm.with_skip(x)
    assert asked == [want] * 3


def test_parameter_count_matches_config():
    for cfg in CONFIGS.values():
        state = nnx.state(make_model(cfg))  # everything a train state would hold: parameters only
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()


def test_every_parameter_has_logical_axes_of_its_rank():
    for path, variable in nnx.iter_graph(make_model(CONFIGS["gqa-tied"])):
        if isinstance(variable, nnx.Param):
            axes = variable.get_metadata()["logical_axes"]
            assert len(axes) == variable[...].ndim, path
