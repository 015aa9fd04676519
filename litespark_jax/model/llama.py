"""The Llama decoder: embedding, a stack of ``DecoderLayer``s run by ``lax.scan``, final norm, output head.

The layers are created with a leading ``layers`` axis on every parameter (one stacked copy per weight), so one
traced layer serves the whole depth: compile time does not grow with ``num_layers``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from litespark_jax.config import ModelConfig
from litespark_jax.model.layers import DecoderLayer, RMSNorm, normal_param
from litespark_jax.model.remat import maybe_remat
from litespark_jax.model.rope import inverse_frequencies
from litespark_jax.parallel.logical import constrain


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """``num_layers`` DecoderLayers as one module whose parameters have a leading ``layers`` axis."""
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(DecoderLayer(cfg, rngs=nnx.Rngs(params=key))))(keys)
    layers = nnx.merge(graphdef, state)
    for _, variable in nnx.iter_graph(layers):
        if isinstance(variable, nnx.Param):
            variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))
    return layers


def _is_layer_matrix(a) -> bool:
    """A stacked layer weight matrix ([layers, ...] with 2+ more dims); norm scales, [layers, d], are not."""
    return a.ndim >= 3 and jnp.issubdtype(a.dtype, jnp.floating)


def _cast_matrices(stacked, dtype):
    """Every stacked weight matrix in ``dtype`` (the layers' own ``astype`` then does nothing); norm scales keep
    their dtype, as the norm kernels read them in float32."""
    return jax.tree.map(lambda a: a.astype(dtype) if _is_layer_matrix(a) else a, stacked)


def cast_layer_matrices(params, dtype):
    """``params`` (the model's state) with the stacked layer matrices in ``dtype``, as ``cast_weights_once`` casts them
    inside ``hidden_states`` (which then casts nothing). Differentiating with respect to this tree gives those
    matrices' gradients in ``dtype``: exactly the values the float32 parameters would get (each layer's weight
    gradient is already a ``dtype`` product, used once), in half the bytes for the backward's concatenate, the
    gradient norm and the optimizer update, which upcast as they read."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a.astype(dtype) if getattr(path[0], "key", None) == "layers" and _is_layer_matrix(a) else a,
        params)


def _unstack(stacked, n: int) -> list:
    """The ``n`` per-layer states of a stacked state, by one split per leaf.

    A split's gradient is one concatenate; indexing ``a[i]`` instead gives each layer's gradient as a full-size
    zero-padded array, and the ``n`` of them are summed (seen in the CPU-compiled step: a pad per leaf per layer).
    """
    pieces = jax.tree.map(lambda a: [p.squeeze(0) for p in jnp.split(a, n, axis=0)], stacked)
    return [jax.tree.map(lambda leaf: leaf[i], pieces, is_leaf=lambda v: isinstance(v, list)) for i in range(n)]


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                                  cfg.param_dtype)
        self.layers = _stacked_layers(cfg, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                                        cfg.param_dtype)

    def hidden_states(self, tokens, positions=None, segment_ids=None):
        """Final-norm output [batch, seq, d_model] in the compute dtype."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
        x = constrain(x, ("batch", "seq", "embed"))
        graphdef, stacked = nnx.split(self.layers)
        if cfg.cast_weights_once:
            stacked = _cast_matrices(stacked, cfg.dtype)
        # A constant of the config, not state: computed here so it never becomes a trainable leaf.
        inv_freq = inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)

        def layer_fn(x, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, positions, segment_ids, inv_freq)

        layer_fn = maybe_remat(layer_fn, cfg)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(lambda carry, s: (layer_fn(carry, s), None), x, stacked)
        else:
            for layer_state in _unstack(stacked, cfg.num_layers):
                x = layer_fn(x, layer_state)
        return self.final_norm(x)

    def output_weight(self):
        """The [d_model, vocab] output projection in the compute dtype (the embedding's transpose when tied)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(self.cfg.dtype)

    def __call__(self, tokens, positions=None, segment_ids=None):
        """Logits [batch, seq, vocab] in float32. Training uses ``hidden_states`` and a fused loss instead."""
        h = self.hidden_states(tokens, positions, segment_ids)
        logits = jnp.einsum("bsd,dv->bsv", h, self.output_weight(), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))
