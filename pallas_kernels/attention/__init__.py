"""Attention: ``attention(q, k, v, segment_ids=..., causal=..., impl=...)``.

Implementations:

* ``reference``: plain JAX, any platform (the numerics every other implementation is tested against).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs. With ``segment_ids`` it passes
  a boolean mask (cuDNN's packed "THD" layout is opt-in), see ``cudnn.py``.
* ``pallas``: the Hopper flash attention kernel in Pallas Mosaic GPU (``mosaic_gpu.py``), only on Hopper.

``auto`` picks the reference on CPU; on GPUs, the implementation measured fastest for the shape (``_pallas_wins``
below, from ``docs/perf/attention.md``), falling back to cuDNN when the Pallas kernel does not support the shape
(seq not a multiple of 128, head_dim not 64/128, seq_q != seq_k, non-16-bit dtypes) or is not measured faster,
and to the reference where cuDNN does not take the inputs either (float32, head dims cuDNN does not support, odd
sequence lengths, causal attention with seq_q != seq_k: ``cudnn.supports``).
"""

from __future__ import annotations

from pallas_kernels._dispatch import REFERENCE, Registry, is_hopper, platform
from pallas_kernels.attention import cudnn as _cudnn_mod
from pallas_kernels.attention import reference

def _pallas_wins(q_shape, causal: bool, has_segments: bool) -> bool:
    """Where the Pallas kernel was measured at least as fast as cuDNN (forward+backward, bf16, H100;
    docs/perf/attention.md, run 4 unless noted).

    * segment ids (packed documents): the kernel skips kv blocks outside each tile's documents; cuDNN takes a dense
      [B, 1, S, S] mask. 3.7x cuDNN at B4 S4096 H32 KV8 D128 causal, documents of 256-2048 tokens (run 3).
    * causal, no segment ids: 1.17x at B4 S4096 H32 KV8 D128, 1.14x at the 3B shape (H24), 1.05x at B2 S8192,
      1.02x at head_dim 64 (on par; its dK/dV errors are lower than cuDNN's).
    * non-causal and S > 8192: not measured for the kernel; they stay on cuDNN.
    """
    if has_segments:
        return True
    return causal and q_shape[1] <= 8192


def _auto(*, q_shape=None, kv_shape=None, dtype=None, has_segments=False, causal=True, **_) -> str:
    if platform() != "gpu":
        return REFERENCE
    if is_hopper() and q_shape is not None:
        from pallas_kernels.attention import mosaic_gpu

        if mosaic_gpu.supports(q_shape, kv_shape, dtype) is None and _pallas_wins(q_shape, causal, has_segments):
            return "pallas"
    if q_shape is not None and _cudnn_mod.supports(q_shape, dtype, kv_shape=kv_shape, causal=causal) is not None:
        return REFERENCE  # e.g. a float32 model or an odd sequence length on a GPU: XLA's attention
    return "cudnn"


registry = Registry("attention", _auto)
registry.register(REFERENCE)(reference.attention)
registry.register("cudnn", available=lambda: platform() == "gpu", needs="an NVIDIA GPU")(_cudnn_mod.attention)


@registry.register("pallas", available=is_hopper, needs="an NVIDIA Hopper GPU (compute capability 9.x)")
def _pallas(q, k, v, *, segment_ids=None, causal=True, softmax_scale=None):
    from pallas_kernels.attention import mosaic_gpu

    return mosaic_gpu.attention(q, k, v, segment_ids=segment_ids, causal=causal, softmax_scale=softmax_scale)


def attention(q, k, v, *, segment_ids=None, causal: bool = True, softmax_scale: float | None = None,
              impl: str = "auto"):
    """Multi-head attention with grouped KV heads; see ``reference.py`` for layouts and semantics."""
    _, fn = registry.resolve(impl, q_shape=q.shape, kv_shape=k.shape, dtype=q.dtype,
                             has_segments=segment_ids is not None, causal=causal)
    return fn(q, k, v, segment_ids=segment_ids, causal=causal, softmax_scale=softmax_scale)
