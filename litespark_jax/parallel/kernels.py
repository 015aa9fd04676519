"""Kernels under sharding: ``shard_map`` wrappers that hand each device whole sequences and whole heads.

A Pallas, Triton or cuDNN kernel is a custom call that XLA's SPMD partitioner cannot split, so under a mesh it must
run inside ``shard_map`` on per-device blocks. ``rms_norm``, ``rms_norm_and_skip`` and ``mlp`` here have the
signatures of their ``pallas_kernels`` functions and work on rows ([batch, seq, ...] activations, weights whole):
when every mesh axis of more than one device splits rows (data, fsdp, context: data parallelism, FSDP, context
parallelism), each device runs the kernel on its rows, with the weights gathered whole (as FSDP gathers them for
XLA's matmuls) and their gradients summed over the mesh; when another axis splits the work (tensor), ``auto`` becomes
the XLA implementation (``fused``), which the partitioner can split. ``attention`` has the signature of
``pallas_kernels.attention`` and:

* splits the batch over the batch mesh axes (data, fsdp) and the heads over ``tensor``;
* for context parallelism (the sequence split over ``context``) re-shards Q, K, V from sequence-split to head-split
  with an all-to-all (DeepSpeed-Ulysses), so every device runs the unmodified kernel on full sequences for
  ``heads / (tensor x context)`` heads (causal masks and packed segments stay exact), then all-to-alls back.
  When the KV heads do not divide ``tensor x context``, K/V heads are repeated just enough (GQA groups permitting).

Without an active mesh (``use_rules``) it is exactly ``pallas_kernels.attention``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import pallas_kernels
from litespark_jax.errors import ConfigError
from litespark_jax.parallel.logical import active, logical_to_spec
from pallas_kernels.cross_entropy import CHUNKED, SINGLE_PASS
from pallas_kernels.mlp.fused import GATE_UP_NAME


def _names(entry) -> tuple[str, ...]:
    """The mesh axes of one spec entry (None, an axis name, or a tuple of them)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _axes(rules, name) -> tuple[str, ...]:
    return _names(rules.get(name))


def _spec_over_every_axis(entries: list, mesh) -> P:
    """``entries`` with the one-device mesh axes they leave out added to the first dimension.

    A shard_map input that leaves a mesh axis out is replicated over it, and the map's transpose then sums that
    input's gradient over the axis: the data-parallel gradient sum where the axis has several devices, but an
    all-reduce per input even over a one-device axis. Naming those avoids them without a partly automatic map
    (which host callbacks, such as Triton's interpreter, do not support)."""
    used = {a for e in entries for a in _names(e)}
    rest = tuple(a for a, size in mesh.shape.items() if size == 1 and a not in used)
    first = (*_names(entries[0]), *rest)
    return P(first[0] if len(first) == 1 else (first or None), *entries[1:])


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
    qkv_spec = _spec_over_every_axis([batch_spec, None, head_spec, None], mesh)
    seg_spec = _spec_over_every_axis([batch_spec, None], mesh)

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


# The XLA implementation of each row kernel, which GSPMD partitions when a shard_map over rows does not fit the mesh.
_XLA_FALLBACK = "fused"
# What the row kernels name among their backward residuals: kept across an FSDP map's rematerialization.
_KERNEL_RESIDUALS = (GATE_UP_NAME,)


def _row_axes(mesh, rules, x) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(batch axes, seq axes) of more than one device, or None when some other axis of more than one device exists
    or ``x`` is not [batch, seq, ...]: then per-device rows are not the whole computation."""
    sizes = dict(mesh.shape)
    batch = tuple(a for a in _axes(rules, "batch") if sizes[a] > 1)
    seq = tuple(a for a in _axes(rules, "seq") if sizes[a] > 1 and a not in batch)
    if x.ndim < 3 or any(size > 1 and a not in (*batch, *seq) for a, size in sizes.items()):
        return None
    return batch, seq


def _weight_layout(axes, mesh, rules) -> tuple[P, list[tuple[int, tuple[str, ...]]]]:
    """The shard_map spec of a weight with logical ``axes`` (its FSDP sharding: the mesh axes of more than one
    device that its rules name) and the (dimension, mesh axes) to all-gather it over inside."""
    sizes = dict(mesh.shape)
    entries, gathers = [], []
    for dim, entry in enumerate(logical_to_spec(axes, rules)):
        names = tuple(a for a in _names(entry) if sizes[a] > 1)
        entries.append(names[0] if len(names) == 1 else (names or None))
        if names:
            gathers.append((dim, names))
    return _spec_over_every_axis(entries, mesh), gathers


def _gathered(w, gathers):
    """A weight shard all-gathered whole over the (dimension, mesh axes) of ``_weight_layout``."""
    for dim, names in gathers:
        w = jax.lax.all_gather(w, names, axis=dim, tiled=True)
    return w


def _over_rows(fn, x, weights, weight_axes, impl: str, n_out: int = 1):
    """``fn(x, *weights, impl=...)`` on each device's rows under the active mesh (see the module docstring).

    Each weight enters sharded as the rules shard it (FSDP) and is all-gathered whole inside, so its gradient
    leaves reduce-scattered, as XLA's own FSDP matmuls do; over the axes that do not shard it (data) it is
    replicated, and its gradient is summed over them. The kernels' custom VJPs keep their weights for the backward:
    kept gathered, every layer's whole weights would stay in memory until then (XLA's CPU footprint of 1x8 FSDP
    steps grew 10-16%), so the map is rematerialized keeping only the kernels' named residuals (the MLP's
    pre-activation) and the weights are gathered again in the backward (then within 0-3% of XLA's own FSDP)."""
    current = active()
    if current is None or current[0].size == 1:
        return fn(x, *weights, impl=impl)
    mesh, rules = current
    row_axes = _row_axes(mesh, rules, x)
    if row_axes is None:
        return fn(x, *weights, impl=_XLA_FALLBACK if impl == "auto" else impl)
    batch, seq = row_axes
    spec = _spec_over_every_axis([batch or None, seq or None, *([None] * (x.ndim - 2))], mesh)
    layouts = [_weight_layout(axes, mesh, rules) for axes in weight_axes]

    def local(x, *weights):
        return fn(x, *(_gathered(w, gathers) for w, (_, gathers) in zip(weights, layouts)), impl=impl)

    if any(gathers for _, gathers in layouts):
        local = jax.checkpoint(local, policy=jax.checkpoint_policies.save_only_these_names(*_KERNEL_RESIDUALS))
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    in_specs = (spec, *(weight_spec for weight_spec, _ in layouts))
    out_specs = spec if n_out == 1 else (spec,) * n_out
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(x, *weights)


def rms_norm(x, scale, *, eps: float = 1e-5, impl: str = "auto", scale_axes=(None,)):
    """``pallas_kernels.rms_norm`` under the active mesh; ``scale_axes``: the scale's logical axes."""
    return _over_rows(lambda x, s, impl: pallas_kernels.rms_norm(x, s, eps=eps, impl=impl), x, (scale,),
                      (scale_axes,), impl)


def rms_norm_and_skip(x, scale, *, eps: float = 1e-5, impl: str = "auto", scale_axes=(None,)):
    """``pallas_kernels.rms_norm_and_skip`` under the active mesh."""
    return _over_rows(lambda x, s, impl: pallas_kernels.rms_norm_and_skip(x, s, eps=eps, impl=impl), x, (scale,),
                      (scale_axes,), impl, n_out=2)


def mlp(x, w_gate_up, w_down, *, impl: str = "auto", weight_axes=((None, None, None), (None, None))):
    """``pallas_kernels.mlp`` under the active mesh; ``weight_axes``: the two weights' logical axes."""
    return _over_rows(pallas_kernels.mlp, x, (w_gate_up, w_down), weight_axes, impl)


def cross_entropy_sum(x, w, targets, weights, *, z_loss_weight: float = 0.0, impl: str = "auto",
                      w_axes=("embed", "vocab")):
    """``pallas_kernels.cross_entropy_sum`` under the active mesh; ``w_axes``: the output weight's logical axes.

    When the mesh splits only rows, each device sums its own rows' losses with the weight gathered whole, and the
    per-device sums are added outside the map: a kernel that loops over token chunks (``single_pass``) would
    otherwise leave the partitioner a sharded contraction per chunk, i.e. one reduction of the whole weight
    gradient per chunk instead of one per step. When another axis splits the work (tensor: a sharded vocabulary),
    the partitioner runs the vocabulary-chunked kernel (``chunked``) instead of ``single_pass``."""
    call = functools.partial(pallas_kernels.cross_entropy_sum, z_loss_weight=z_loss_weight)
    current = active()
    if current is None or current[0].size == 1:
        return call(x, w, targets, weights, impl=impl)
    mesh, rules = current
    row_axes = _row_axes(mesh, rules, x)
    if row_axes is None:
        if impl in ("auto", SINGLE_PASS):
            rule = pallas_kernels.registries()["cross_entropy_sum"].rule(x_shape=x.shape, w_shape=w.shape)
            impl = CHUNKED if rule == SINGLE_PASS else rule
        return call(x, w, targets, weights, impl=impl)
    batch, seq = row_axes
    x_spec = _spec_over_every_axis([batch or None, seq or None, None], mesh)
    row_spec = P(*x_spec[:2])
    w_spec, gathers = _weight_layout(w_axes, mesh, rules)

    def local(x, w, targets, weights):
        return call(x, _gathered(w, gathers), targets, weights, impl=impl).reshape(1)

    constrain = lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))  # noqa: E731
    x, targets, weights = constrain(x, x_spec), constrain(targets, row_spec), constrain(weights, row_spec)
    per_device = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec, row_spec, row_spec),
                               out_specs=P(tuple(mesh.axis_names)), check_vma=False)(x, w, targets, weights)
    return jnp.sum(per_device)
