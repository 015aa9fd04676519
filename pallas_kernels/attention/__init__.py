"""Attention: ``attention(q, k, v, segment_ids=..., causal=..., impl=...)``.

Implementations:

* ``reference``: plain JAX, any platform (the numerics every other implementation is tested against).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs. With ``segment_ids`` it uses
  cuDNN's packed-sequence ("THD" ragged offsets) support for contiguous documents, see ``cudnn.py``.
* ``pallas``: the Hopper flash attention kernel in Pallas Mosaic GPU (``mosaic_gpu.py``), only on Hopper.

``auto`` picks the reference on CPU; on GPUs, the implementation measured fastest for the shape (table
``_PALLAS_WINS`` below, filled from ``docs/perf/attention.md``), falling back to cuDNN when the Pallas kernel does
not support the shape.
"""

from __future__ import annotations

from pallas_kernels._dispatch import REFERENCE, Registry, is_hopper, platform
from pallas_kernels.attention import cudnn as _cudnn_mod
from pallas_kernels.attention import reference

# (head_dim, causal) -> True where the Pallas kernel was measured faster than cuDNN (forward + backward) on H100.
# Filled from docs/perf/attention.md; keys absent mean "use cuDNN".
_PALLAS_WINS: dict[tuple[int, bool], bool] = {}


def _auto(*, q_shape=None, kv_shape=None, dtype=None, has_segments=False, causal=True, **_) -> str:
    if platform() != "gpu":
        return REFERENCE
    if is_hopper() and q_shape is not None:
        from pallas_kernels.attention import mosaic_gpu

        if mosaic_gpu.supports(q_shape, kv_shape, dtype) is None and _PALLAS_WINS.get((q_shape[-1], bool(causal))):
            return "pallas"
    return "cudnn"


registry = Registry("attention", _auto)
registry.register(REFERENCE)(reference.attention)
registry.register("cudnn", available=lambda: platform() == "gpu")(_cudnn_mod.attention)


@registry.register("pallas", available=is_hopper)
def _pallas(q, k, v, *, segment_ids=None, causal=True, softmax_scale=None):
    from pallas_kernels.attention import mosaic_gpu

    return mosaic_gpu.attention(q, k, v, segment_ids=segment_ids, causal=causal, softmax_scale=softmax_scale)


def attention(q, k, v, *, segment_ids=None, causal: bool = True, softmax_scale: float | None = None,
              impl: str = "auto"):
    """Multi-head attention with grouped KV heads; see ``reference.py`` for layouts and semantics."""
    _, fn = registry.resolve(impl, q_shape=q.shape, kv_shape=k.shape, dtype=q.dtype,
                             has_segments=segment_ids is not None, causal=causal)
    return fn(q, k, v, segment_ids=segment_ids, causal=causal, softmax_scale=softmax_scale)
