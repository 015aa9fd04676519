"""SwiGLU MLP with a hand-written VJP (pure JAX / XLA).

Same contract as ``reference.mlp``. The forward does one matmul against the fused [gate|up] weight (``w_gate_up``
[d, 2, f] viewed as [d, 2f]), the SiLU(gate) * up epilogue in float32, and the down projection. Autodiff of the
reference keeps float32 intermediates and transposes its float32-output matmuls into float32 x bf16 matmuls, which
run far below the bf16 rate. This VJP keeps only ``x`` and the [N, 2, f] pre-activation in ``x``'s dtype, recomputes
the hidden activation from it elementwise in the backward (no extra matmul), and runs all four backward matmuls on
``x``'s dtype with float32 accumulation (their outputs are rounded to ``x``'s dtype, as a cuBLAS bf16 training step
does); the elementwise math is float32.

``gate_up_f32=True`` (the default) takes the gate/up matmul's output in float32 for the forward epilogue, so the
forward equals the reference's, and rounds only the saved residual; ``False`` rounds the matmul output itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _gate_up(x2, w_gate_up, out_dtype):
    d, two, f = w_gate_up.shape
    gu = jnp.dot(x2, w_gate_up.reshape(d, two * f), preferred_element_type=jnp.float32)
    return gu.astype(out_dtype).reshape(x2.shape[0], two, f)


def _hidden(gu):
    g = gu[:, 0, :].astype(jnp.float32)
    u = gu[:, 1, :].astype(jnp.float32)
    return jax.nn.silu(g) * u


def _forward(x2, w_gate_up, w_down, gate_up_f32):
    gu = _gate_up(x2, w_gate_up, jnp.float32 if gate_up_f32 else x2.dtype)
    h = _hidden(gu).astype(x2.dtype)
    out = jnp.dot(h, w_down, preferred_element_type=jnp.float32).astype(x2.dtype)
    return out, gu.astype(x2.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlp(x2, w_gate_up, w_down, gate_up_f32):
    return _forward(x2, w_gate_up, w_down, gate_up_f32)[0]


def _mlp_fwd(x2, w_gate_up, w_down, gate_up_f32):
    out, gu = _forward(x2, w_gate_up, w_down, gate_up_f32)
    return out, (x2, gu, w_gate_up, w_down)


def _mlp_bwd(gate_up_f32, res, dy):
    del gate_up_f32
    x2, gu, w_gate_up, w_down = res
    d, two, f = w_gate_up.shape
    dy = dy.astype(x2.dtype)
    dh = jnp.dot(dy, w_down.T, preferred_element_type=jnp.float32).astype(x2.dtype).astype(jnp.float32)
    g = gu[:, 0, :].astype(jnp.float32)
    u = gu[:, 1, :].astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    h = (silu * u).astype(x2.dtype)
    dg = dh * u * (sig * (1.0 + g * (1.0 - sig)))
    du = dh * silu
    dgu = jnp.stack([dg, du], axis=1).astype(x2.dtype).reshape(-1, two * f)  # [N, 2f]
    dw_down = jnp.dot(h.T, dy, preferred_element_type=jnp.float32).astype(w_down.dtype)
    dx = jnp.dot(dgu, w_gate_up.reshape(d, two * f).T, preferred_element_type=jnp.float32).astype(x2.dtype)
    dw_gu = jnp.dot(x2.T, dgu, preferred_element_type=jnp.float32).astype(w_gate_up.dtype).reshape(d, two, f)
    return dx, dw_gu, dw_down


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def mlp(x, w_gate_up, w_down, *, gate_up_f32: bool = True):
    lead = x.shape[:-1]
    out = _mlp(x.reshape(-1, x.shape[-1]), w_gate_up, w_down, bool(gate_up_f32))
    return out.reshape(*lead, w_down.shape[1])
