"""Reference RMSNorm in plain JAX: ``x / sqrt(mean(x**2) + eps) * scale``, computed in float32.

``x`` [..., d]; ``scale`` [d]. Returns ``x``'s dtype (the Llama convention: normalize in float32, cast back, then
multiply by the weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale, *, eps: float = 1e-5):
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)
