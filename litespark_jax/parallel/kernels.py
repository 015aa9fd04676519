"""Kernels under sharding: ``shard_map`` wrappers that hand each device whole sequences and whole heads.

A Pallas or cuDNN kernel is a custom call that XLA's SPMD partitioner cannot split, so under a mesh it must run
inside ``shard_map`` on per-device blocks. ``attention`` here has the signature of ``pallas_kernels.attention`` and:

* splits the batch over the batch mesh axes (data, fsdp) and the heads over ``tensor``;
* for context parallelism (the sequence split over ``context``) re-shards Q, K, V from sequence-split to head-split
  with an all-to-all (DeepSpeed-Ulysses), so every device runs the unmodified kernel on full sequences for
  ``heads / (tensor x context)`` heads (causal masks and packed segments stay exact), then all-to-alls back.
  When the KV heads do not divide ``tensor x context``, K/V heads are repeated just enough (GQA groups permitting).

Without an active mesh (``use_rules``) it is exactly ``pallas_kernels.attention``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import pallas_kernels
from litespark_jax.errors import ConfigError
from litespark_jax.parallel.logical import active, logical_to_spec


def _axes(rules, name) -> tuple[str, ...]:
    value = rules.get(name)
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def attention(q, k, v, *, segment_ids=None, causal: bool = True, softmax_scale: float | None = None,
              impl: str = "auto"):
    current = active()
    if current is None:
        return pallas_kernels.attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                        softmax_scale=softmax_scale, impl=impl)
    mesh, rules = current
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in _axes(rules, "batch") if sizes[a] > 1)
    head_axes = tuple(a for a in (*_axes(rules, "heads"), *_axes(rules, "seq")) if sizes[a] > 1)
    head_split = math.prod(sizes[a] for a in head_axes)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % head_split:
        raise ConfigError(f"attention: model.num_heads ({heads}) must be divisible by mesh.tensor x mesh.context "
                          f"({head_split}) for sharded attention")
    if kv_heads % head_split:
        repeat = head_split // math.gcd(kv_heads, head_split)
        if (heads // kv_heads) % repeat:
            raise ConfigError(f"attention: model.num_kv_heads ({kv_heads}) cannot be spread over mesh.tensor x "
                              f"mesh.context ({head_split})")
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    batch_spec = batch_axes or None
    head_spec = head_axes or None
    qkv_spec = P(batch_spec, None, head_spec, None)
    seg_spec = P(batch_spec, None)

    def local(q, k, v, segment_ids):
        return pallas_kernels.attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                        softmax_scale=softmax_scale, impl=impl)

    constrain = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))  # noqa: E731
    q, k, v = (constrain(x, qkv_spec) for x in (q, k, v))
    in_specs = (qkv_spec, qkv_spec, qkv_spec, seg_spec if segment_ids is not None else None)
    if segment_ids is not None:
        segment_ids = constrain(segment_ids, seg_spec)
        out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(
            q, k, v, segment_ids)
    else:
        out = jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=in_specs[:3],
                            out_specs=qkv_spec, check_vma=False)(q, k, v)
    return constrain(out, logical_to_spec(("batch", "seq", "heads", "head_dim"), rules))
