"""The blocks of a Llama decoder: ``RMSNorm``, ``Attention``, ``MLP`` and ``DecoderLayer``.

Parameters are stored in ``param_dtype`` (float32) and cast to the compute ``dtype`` where they are used. Every
parameter carries ``logical_axes`` metadata and key activations are pinned with ``constrain``, so the sharding
rules (not this file) decide where things live. The math is delegated to ``pallas_kernels`` (through
``litespark_jax.parallel.kernels``, which runs its custom-call kernels per device under a mesh), which picks the
implementation for the platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from litespark_jax.config import ACTIVATION_NAMES, ModelConfig
from litespark_jax.model.rope import apply_rope
from litespark_jax.parallel import kernels as sharded
from litespark_jax.parallel.logical import constrain

__all__ = ["ACTIVATION_NAMES", "Attention", "DecoderLayer", "MLP", "RMSNorm"]


def normal_param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    SCALE_AXES = ("embed",)

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), logical_axes=self.SCALE_AXES)
        self.eps = cfg.norm_eps
        self.impl = cfg.rms_norm_impl

    def __call__(self, x):
        return sharded.rms_norm(x, self.scale[...], eps=self.eps, impl=self.impl, scale_axes=self.SCALE_AXES)

    def with_skip(self, x):
        """``(self(x), x)`` for a pre-norm block, whose residual connection also reads ``x``: kernels that can
        sum the two gradients of ``x`` inside the norm's backward do (``pallas_kernels.rms_norm_and_skip``)."""
        return sharded.rms_norm_and_skip(x, self.scale[...], eps=self.eps, impl=self.impl,
                                         scale_axes=self.SCALE_AXES)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; K/V keep ``num_kv_heads`` heads (never repeated in memory)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pd, std = cfg.param_dtype, cfg.init_std
        self.wq = normal_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, pd)
        self.wk = normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = normal_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std, pd)
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.attention_impl

    def __call__(self, x, positions, segment_ids, inv_freq):
        dt = self.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        q = checkpoint_name(constrain(apply_rope(q, positions, inv_freq), ("batch", "seq", "heads", "head_dim")), "query")
        k = checkpoint_name(constrain(apply_rope(k, positions, inv_freq), ("batch", "seq", "kv_heads", "head_dim")), "key")
        v = checkpoint_name(constrain(v, ("batch", "seq", "kv_heads", "head_dim")), "value")
        # Through the shard_map wrapper: custom-call kernels run per device on whole sequences and whole heads.
        out = sharded.attention(q, k, v, segment_ids=segment_ids, causal=True, impl=self.impl)
        out = checkpoint_name(out, "attention_out")
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(dt))


class MLP(nnx.Module):
    """SwiGLU feed-forward block with the gate and up projections in one weight ([d_model, 2, d_ff])."""

    GATE_UP_AXES = ("embed", None, "mlp")
    DOWN_AXES = ("mlp", "embed")

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd, std = cfg.d_model, cfg.d_ff, cfg.param_dtype, cfg.init_std
        self.w_gate_up = normal_param(rngs, (d, 2, f), self.GATE_UP_AXES, std, pd)
        self.w_down = normal_param(rngs, (f, d), self.DOWN_AXES, std, pd)
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.mlp_impl

    def __call__(self, x):
        dt = self.dtype
        return sharded.mlp(x, self.w_gate_up[...].astype(dt), self.w_down[...].astype(dt), impl=self.impl,
                           weight_axes=(self.GATE_UP_AXES, self.DOWN_AXES))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.d_model, cfg)
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, inv_freq):
        h, x = self.attention_norm.with_skip(x)
        h = checkpoint_name(h, "attention_in")
        h = checkpoint_name(self.attention(h, positions, segment_ids, inv_freq), "attention_proj")
        x = checkpoint_name(constrain(x + h, ("batch", "seq", "embed")), "residual_mid")
        h, x = self.mlp_norm.with_skip(x)
        h = checkpoint_name(h, "mlp_in")
        h = checkpoint_name(self.mlp(h), "mlp_out")
        return constrain(x + h, ("batch", "seq", "embed"))
