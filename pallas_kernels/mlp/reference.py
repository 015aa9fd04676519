"""Reference SwiGLU MLP in plain JAX.

``x`` [..., d_model]; ``w_gate_up`` [d_model, 2, d_ff] holds the gate and up projections side by side (index 0 is
the gate) so one matmul computes both and tensor parallelism can split ``d_ff`` without separating them;
``w_down`` [d_ff, d_model]. Matmuls accumulate in float32 and return ``x``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def mlp(x, w_gate_up, w_down):
    gate_up = jnp.einsum("...d,dtf->...tf", x, w_gate_up, preferred_element_type=jnp.float32)
    gate_up = checkpoint_name(gate_up, "mlp_gate_up")  # the name fused.py gives its saved pre-activation
    hidden = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    out = jnp.einsum("...f,fd->...d", hidden.astype(x.dtype), w_down, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
