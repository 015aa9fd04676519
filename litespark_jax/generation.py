"""Autoregressive text generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

The cache path reuses the model's own weights and blocks: the stacked layer parameters are scanned exactly like
``Llama.hidden_states`` does, each layer's ``attention_norm``, ``mlp_norm`` and ``mlp`` are called as they are, and
only attention is re-expressed here (``_cached_attention``): it writes the new keys/values into a fixed-size cache
and lets every query attend to the cached keys up to its own slot. Projections, RoPE (``apply_rope`` with the
model's ``inverse_frequencies``), the 1/sqrt(head_dim) scale and the float32 softmax are the same as in the model,
so greedy decoding with the cache gives the same tokens as recomputing the whole sequence each step
(``generate_recompute``, kept as the reference the tests compare against).

Generation is one jitted program: a prefill over the (left-padded) prompts, then a ``lax.while_loop`` of
single-token decode steps that stops early once every row has produced one of the stop ids (``eos_id``).

    tokens = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=20, temperature=0.8, top_p=0.9))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from litespark_jax.model.rope import apply_rope, inverse_frequencies


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature=0`` is greedy (argmax); top-k and top-p apply when sampling."""

    max_new_tokens: int = 64
    """Tokens generated after the prompt (fewer if every row stops at ``eos_id``)."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = no limit)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0 = no limit)."""
    seed: int = 0
    """PRNG seed of the sampler (same seed, same samples)."""
    eos_id: int | Sequence[int] | None = None
    """Stop a row once it produces this token, or any of these (a chat model ends its turn with the template's
    end-of-turn token, not EOS); the stop token is kept in the output. None never stops early."""

    def __post_init__(self):
        if self.eos_id is not None and not isinstance(self.eos_id, (int, np.integer)):  # a hashable jit key
            object.__setattr__(self, "eos_id", tuple(sorted({int(i) for i in self.eos_id})))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The stop ids as a tuple (empty: never stop early)."""
        if self.eos_id is None:
            return ()
        return self.eos_id if isinstance(self.eos_id, tuple) else (int(self.eos_id),)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must not be negative, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):  # greedy would silently ignore them
            raise ValueError(f"top_k={self.top_k} / top_p={self.top_p} only apply when sampling: set temperature > 0")


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_logits(logits, key, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next tokens [batch] int32 from float32 logits [batch, vocab]."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the most likely token always has before == 0, so it is kept
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# The cached forward pass


def init_cache(cfg, batch: int, length: int):
    """Zeroed K/V caches, each [layers, batch, length, kv_heads, head_dim] in the compute dtype."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


def _cached_attention(attention, x, positions, k_cache, v_cache, index, key_mask, inv_freq):
    """``attention`` (a model ``Attention`` block) over ``x`` [b, s, d] whose tokens go to cache slots
    ``index .. index+s``; ``key_mask`` [b, s, T] says which cache slots each query may read."""
    dt = attention.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, attention.wq[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, attention.wk[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, attention.wv[...].astype(dt))
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
    # Same numerics as pallas_kernels' reference attention: grouped heads, float32 scores and softmax.
    b, s, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.reshape(b, s, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k_cache.astype(dt), preferred_element_type=jnp.float32) * hd**-0.5
    mask = key_mask[:, None, None]  # [b, 1, 1, q, T]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(dt), v_cache.astype(dt), preferred_element_type=jnp.float32)
    out = out.reshape(b, s, heads, hd).astype(dt)
    return jnp.einsum("bshk,hkd->bsd", out, attention.wo[...].astype(dt)), k_cache, v_cache


def forward_with_cache(model, tokens, cache, index, pad):
    """Logits [b, s, vocab] (float32) of ``tokens`` [b, s] written to cache slots ``index .. index+s``, and the
    updated cache. Row ``r`` is left-padded by ``pad[r]`` slots: its positions start at 0 after the padding and
    its queries never read the padding."""
    cfg = model.cfg
    b, s = tokens.shape
    length = cache["k"].shape[2]
    slots = index + jnp.arange(s)
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    key_slots = jnp.arange(length)
    key_mask = (key_slots[None, None, :] <= slots[None, :, None]) & (key_slots[None, None, :] >= pad[:, None, None])
    inv_freq = inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(cfg.dtype)
    graphdef, stacked = nnx.split(model.layers)

    def layer_fn(x, xs):
        layer_state, k_cache, v_cache = xs
        layer = nnx.merge(graphdef, layer_state)
        h, k_cache, v_cache = _cached_attention(layer.attention, layer.attention_norm(x), positions, k_cache, v_cache,
                                                index, key_mask, inv_freq)
        x = x + h
        x = x + layer.mlp(layer.mlp_norm(x))
        return x, (k_cache, v_cache)

    x, (k, v) = jax.lax.scan(layer_fn, x, (stacked, cache["k"], cache["v"]))
    h = model.final_norm(x)
    logits = jnp.einsum("bsd,dv->bsv", h, model.output_weight(), preferred_element_type=jnp.float32)
    return logits, {"k": k, "v": v}


def _jitted(kind: str, graphdef, fn, **static):
    """One jitted ``fn(state, *args)`` per model shape and static arguments. The graphdef cannot be a static jit
    argument itself (the config it carries may hold a dict, e.g. rope_scaling), so it is keyed by its repr."""
    key = (kind, repr(graphdef), tuple(sorted(static.items())))  # the repr includes the model config
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(functools.partial(fn, graphdef, **static))
    return _JIT_CACHE[key]


_JIT_CACHE: dict = {}
_PROMPT_BUCKET = 16


def _generate_program(graphdef, state, prompt, pad, seed, *, sampling: SamplingConfig):
    model = nnx.merge(graphdef, state)
    b, prompt_len = prompt.shape
    n = sampling.max_new_tokens
    cache = init_cache(model.cfg, b, prompt_len + n)
    logits, cache = forward_with_cache(model, prompt, cache, 0, pad)
    stops = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)
    fill = sampling.stop_ids[0] if sampling.stop_ids else 0  # what a finished row emits (dropped by ``generate``)
    out = jnp.full((b, n), fill, jnp.int32)
    sample = functools.partial(sample_logits, temperature=sampling.temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, last_logits, key, done, out = carry
        key, sub = jax.random.split(key)
        token = sample(last_logits, sub)
        token = jnp.where(done, fill, token)
        out = out.at[:, i].set(token)
        done = done | jnp.isin(token, stops)
        logits, cache = forward_with_cache(model, token[:, None], cache, prompt_len + i, pad)
        return i + 1, cache, logits[:, 0], key, done, out

    carry = (jnp.int32(0), cache, logits[:, -1], jax.random.key(seed), jnp.zeros((b,), bool), out)
    i, *_, out = jax.lax.while_loop(cond, body, carry)
    return out, i


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1):
    """[batch, width] int32 left-padded prompts (width a multiple of ``multiple``) and each row's padding."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    width = -(-max(lengths) // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, width - len(p):] = np.asarray(p, np.int32)
    return tokens, np.asarray([width - n for n in lengths], np.int32)


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig()) -> list[list[int]]:
    """The new tokens of each prompt (token ids, without the prompt), decoded with the KV cache.

    Prompts may have different lengths (they are left-padded; padding is never attended to). A row that produced
    a stop id (``eos_id``) keeps it as its last token and stops; all rows stop after ``max_new_tokens``.
    """
    sampling.validate()
    cfg = model.cfg
    tokens, pad = _left_pad(prompts)
    if tokens.shape[1] + sampling.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({sampling.max_new_tokens}) is longer "
                         f"than model.max_seq_len ({cfg.max_seq_len})")
    # Pad prompts to a multiple of 16 tokens (padding is never attended to) so that new prompt lengths rarely
    # compile a new program.
    bucketed, bucketed_pad = _left_pad(prompts, multiple=_PROMPT_BUCKET)
    if bucketed.shape[1] + sampling.max_new_tokens <= cfg.max_seq_len:
        tokens, pad = bucketed, bucketed_pad
    if tokens.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token id {int(tokens.max())} is outside the vocabulary ({cfg.vocab_size})")
    if sampling.max_new_tokens == 0:
        return [[] for _ in prompts]
    graphdef, state = nnx.split(model)
    # The seed is an argument, not a constant: a new seed does not recompile.
    program = _jitted("generate", graphdef, _generate_program, sampling=dataclasses.replace(sampling, seed=0))
    out, steps = jax.device_get(program(state, jnp.asarray(tokens), jnp.asarray(pad), jnp.uint32(sampling.seed)))
    stops = set(sampling.stop_ids)
    results = []
    for row in out[:, : int(steps)].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
        results.append(row[: end + 1])
    return results


# ----------------------------------------------------------------------------------------------------------------
# Reference: recompute the whole sequence each step (no cache)


def _full_logits_at(graphdef, state, tokens, index):
    """Logits at ``index`` of a full (uncached) forward pass over ``tokens`` [1, T]."""
    return nnx.merge(graphdef, state)(tokens)[:, index]


def generate_recompute(model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by running the full model on the whole sequence at every step, without a cache (slow;
    the reference the KV cache is tested against). The sequence is right-padded to its final length so the
    program compiles once; causal attention means the padding never changes the logits read."""
    graphdef, state = nnx.split(model)
    n = len(prompt)
    tokens = np.zeros((1, n + max_new_tokens), np.int32)
    tokens[0, :n] = prompt
    for i in range(n, n + max_new_tokens):
        logits = _jitted("full_logits", graphdef, _full_logits_at)(state, jnp.asarray(tokens), i - 1)
        tokens[0, i] = int(jnp.argmax(logits[0]))
    return tokens[0, n:].tolist()
