"""Hugging Face Llama compatibility: the one table that maps our parameter names to ``transformers``' names.

Our layouts: ``wq`` [d_model, heads, head_dim], ``wk``/``wv`` [d_model, kv_heads, head_dim], ``wo`` [heads,
head_dim, d_model], ``w_gate_up`` [d_model, 2, d_ff], ``w_down`` [d_ff, d_model], stacked with a leading layer
axis. HF stores ``nn.Linear`` weights as [out, in]. Both use the half-split RoPE layout (``rotate_half``), so no
permutation of q/k is needed between the two.
"""

from __future__ import annotations

import numpy as np

from litespark_jax.config import ModelConfig


def _layer_table(cfg: ModelConfig):
    """(HF name suffix, our path inside a layer, to_hf(array) -> array, from_hf(array) -> array)."""
    d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    return [
        ("self_attn.q_proj.weight", ("attention", "wq"), lambda w: w.reshape(d, h * hd).T,
         lambda w: w.T.reshape(d, h, hd)),
        ("self_attn.k_proj.weight", ("attention", "wk"), lambda w: w.reshape(d, kv * hd).T,
         lambda w: w.T.reshape(d, kv, hd)),
        ("self_attn.v_proj.weight", ("attention", "wv"), lambda w: w.reshape(d, kv * hd).T,
         lambda w: w.T.reshape(d, kv, hd)),
        ("self_attn.o_proj.weight", ("attention", "wo"), lambda w: w.reshape(h * hd, d).T,
         lambda w: w.T.reshape(h, hd, d)),
        ("mlp.down_proj.weight", ("mlp", "w_down"), lambda w: w.T, lambda w: w.T),
        ("input_layernorm.weight", ("attention_norm", "scale"), lambda w: w, lambda w: w),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), lambda w: w, lambda w: w),
    ]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our pure parameter dict (``nnx.to_pure_dict``) as HF ``LlamaForCausalLM`` tensors (numpy)."""
    p = _to_numpy(params)
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i in range(cfg.num_layers):
        layer = _get(p, ("layers",))
        prefix = f"model.layers.{i}."
        for hf_name, path, to_hf, _ in _layer_table(cfg):
            out[prefix + hf_name] = to_hf(_get(layer, path)[i])
        gate_up = layer["mlp"]["w_gate_up"][i]
        out[prefix + "mlp.gate_proj.weight"] = gate_up[:, 0, :].T
        out[prefix + "mlp.up_proj.weight"] = gate_up[:, 1, :].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_state_dict(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF tensors as our pure parameter dict (numpy, stacked layers); raises KeyError naming a missing tensor."""
    params: dict = {"embed": tensors["model.embed_tokens.weight"], "final_norm": {"scale": tensors["model.norm.weight"]}}
    if not cfg.tie_embeddings:
        params["lm_head"] = tensors["lm_head.weight"].T
    layers: dict = {}
    for hf_name, path, _, from_hf in _layer_table(cfg):
        _set(layers, path, np.stack([from_hf(tensors[f"model.layers.{i}.{hf_name}"]) for i in range(cfg.num_layers)]))
    gate_up = [
        np.stack([tensors[f"model.layers.{i}.mlp.gate_proj.weight"].T,
                  tensors[f"model.layers.{i}.mlp.up_proj.weight"].T], axis=1)
        for i in range(cfg.num_layers)
    ]
    _set(layers, ("mlp", "w_gate_up"), np.stack(gate_up))
    params["layers"] = layers
    return params


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """The tensor names ``to_hf_state_dict`` writes and ``from_hf_state_dict`` reads, in that order."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    suffixes = [hf_name for hf_name, *_ in _layer_table(cfg)] + ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    return names + [f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers) for suffix in suffixes]


def unexpected_hf_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> list[str]:
    """Sorted names in ``tensors`` that an import for ``cfg`` would silently drop (e.g. a layer beyond
    ``num_hidden_layers``). Skips what HF checkpoints carry harmlessly: RoPE ``inv_freq`` buffers (recomputed from
    the config) and, with tied embeddings, an ``lm_head.weight`` equal to the embedding."""
    used = set(hf_tensor_names(cfg))
    unexpected = []
    for name in sorted(tensors):
        if name in used or name == "rotary_emb.inv_freq" or name.endswith(".rotary_emb.inv_freq"):
            continue
        if (name == "lm_head.weight" and cfg.tie_embeddings
                and np.array_equal(tensors[name], tensors.get("model.embed_tokens.weight"))):
            continue
        unexpected.append(name)
    return unexpected


def hf_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` of the equivalent ``LlamaForCausalLM``."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **cfg.rope_scaling}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
