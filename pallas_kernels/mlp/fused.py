"""SwiGLU MLP with a hand-written VJP (pure JAX / XLA).

Same contract as ``reference.mlp``. The forward does one matmul against the fused [gate|up] weight (``w_gate_up``
[d, 2, f] viewed as [d, 2f]), the SiLU(gate) * up epilogue in float32, and the down projection. Autodiff of the
reference keeps float32 intermediates and transposes its float32-output matmuls into float32 x bf16 matmuls, which
run far below the bf16 rate. This VJP keeps only ``x`` and the [N, 2, f] pre-activation in ``x``'s dtype, recomputes
the hidden activation from it elementwise in the backward (no extra matmul), and runs all four backward matmuls on
``x``'s dtype with float32 accumulation (their outputs are rounded to ``x``'s dtype, as a cuBLAS bf16 training step
does); the elementwise math is float32.

Tensor parallelism: the reshape of ``w_gate_up`` to [d, 2f] merges the ``f`` axis, so when ``f`` is sharded GSPMD
all-gathers the gate/up weight (seen on a CPU 2x2 data x tensor mesh; autodiff of the reference, with 3-D einsums,
does not). ``tp_safe=True`` (registered as ``fused_tp``) uses 3-D einsums instead (upcast to float32 on the CPU only,
whose backend has no standalone bf16 x bf16 -> f32 dot for them) and is all-gather-free on that mesh
(tests/kernels/test_mlp.py), but it is untimed on a GPU, so ``auto`` keeps the measured reshape form; choose
``fused_tp`` when tensor > 1.

``gate_up_f32=True`` (the default) takes the gate/up matmul's output in float32 for the forward epilogue, so the
forward equals the reference's, and rounds only the saved residual; ``False`` rounds the matmul output itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels._dispatch import platform


GATE_UP_NAME = "mlp_gate_up"


def dot_rounded(a, b, dtype):
    """``a @ b`` accumulated in float32 and rounded once to ``dtype``, by the matmul itself.

    Asking for the narrow output directly (rather than a float32 product and ``astype``) makes the rounding the
    GEMM's own: on an H100 the float32 form left separate convert passes over several of these products (the MLP
    input gradient's and the gate/up weight gradient's were 4.1 and 2.7 ms per 3B step); this form ran the 3B step
    1.9% faster (docs/PERFORMANCE.md). The accumulation stays float32 (cuBLAS's compute type for bf16)."""
    return jnp.dot(a, b, preferred_element_type=dtype)


def _gate_up(x2, w_gate_up, out_dtype, tp_safe):
    d, two, f = w_gate_up.shape
    if tp_safe:  # 3-D einsum: no merge of the (possibly sharded) f axis
        gu = jnp.einsum("nd,dtf->ntf", x2, w_gate_up, preferred_element_type=jnp.float32)
        return gu.astype(out_dtype)
    gu = jnp.dot(x2, w_gate_up.reshape(d, two * f), preferred_element_type=jnp.float32)
    return gu.astype(out_dtype).reshape(x2.shape[0], two, f)


def _hidden(gu):
    g = gu[:, 0, :].astype(jnp.float32)
    u = gu[:, 1, :].astype(jnp.float32)
    return jax.nn.silu(g) * u


def swiglu_backward(gu, dh):
    """(dgu [N, 2, f], h [N, f]) in ``dh``'s dtype from the saved pre-activation ``gu`` [N, 2, f] and the gradient
    ``dh`` [N, f] of ``h = silu(gate) * up``; the arithmetic is float32.

    Written so XLA runs it as two passes that share nothing: ``dgu`` as one select over the [N, 2, f] layout (no
    concatenate) and ``h`` with its own (tanh-form) sigmoid. On an H100 the direct form (``dg``, ``du``, ``h`` from one
    sigmoid, then ``stack``) made XLA compute the sigmoid in the ``h`` pass and hand it to the ``stack`` pass as a
    float32 [N, f] array: a 4-byte write and read per element more.
    """
    gu32 = gu.astype(jnp.float32)
    g, u = gu32[:, :1, :], gu32[:, 1:, :]
    sig = jax.nn.sigmoid(g)
    dh3 = dh.astype(jnp.float32)[:, None, :]
    gate_grad = dh3 * u * (sig * (1.0 + g * (1.0 - sig)))
    up_grad = dh3 * (g * sig)
    is_gate = jax.lax.broadcasted_iota(jnp.int32, gu.shape, 1) == 0
    dgu = jnp.where(is_gate, gate_grad, up_grad).astype(dh.dtype)
    g, u = g[:, 0, :], u[:, 0, :]
    h = g * (0.5 + 0.5 * jnp.tanh(0.5 * g)) * u
    return dgu, h.astype(dh.dtype)


def _forward(x2, w_gate_up, w_down, gate_up_f32, tp_safe):
    gu = _gate_up(x2, w_gate_up, jnp.float32 if gate_up_f32 else x2.dtype, tp_safe)
    h = _hidden(gu).astype(x2.dtype)
    return dot_rounded(h, w_down, x2.dtype), gu.astype(x2.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mlp(x2, w_gate_up, w_down, gate_up_f32, tp_safe):
    return _forward(x2, w_gate_up, w_down, gate_up_f32, tp_safe)[0]


def _mlp_fwd(x2, w_gate_up, w_down, gate_up_f32, tp_safe):
    out, gu = _forward(x2, w_gate_up, w_down, gate_up_f32, tp_safe)
    # Named so a remat policy can keep it (model.remat_save_names=[mlp_gate_up]) instead of redoing the matmul.
    return out, (x2, checkpoint_name(gu, GATE_UP_NAME), w_gate_up, w_down)


def _mlp_bwd(gate_up_f32, tp_safe, res, dy):
    del gate_up_f32
    x2, gu, w_gate_up, w_down = res
    return backward(x2, dy.astype(x2.dtype), gu, w_gate_up, w_down,
                    matmuls=_matmul_grads_tp if tp_safe else matmul_grads)


def backward(x2, dy, gu, w_gate_up, w_down, swiglu=None, matmuls=None):
    """(dx, dw_gate_up, dw_down) from the saved ``x2`` and pre-activation ``gu``: the ``dh`` matmul, the SwiGLU
    gradient (``swiglu``: this module's two XLA passes by default, or a kernel with ``swiglu_backward``'s contract),
    then the three matmuls after it (``matmuls``: ``matmul_grads`` by default)."""
    dh = dot_rounded(dy, w_down.T, x2.dtype)
    dgu, h = (swiglu or swiglu_backward)(gu, dh)
    return (matmuls or matmul_grads)(x2, dy, dgu, h, w_gate_up, w_down)


def _matmul_grads_tp(x2, dy, dgu, h, w_gate_up, w_down):
    """``matmul_grads`` with 3-D einsums, which keep a tensor-sharded ``f`` axis sharded."""
    dw_down = jnp.dot(h.T, dy, preferred_element_type=jnp.float32).astype(w_down.dtype)
    # XLA's CPU backend has no standalone bf16 x bf16 -> f32 dot for these: upcast there (CPU speed is moot).
    up = (lambda a: a.astype(jnp.float32)) if platform() == "cpu" else (lambda a: a)
    dx = jnp.einsum("ntf,dtf->nd", up(dgu), up(w_gate_up), preferred_element_type=jnp.float32)
    dw_gu = jnp.einsum("nd,ntf->dtf", up(x2), up(dgu), preferred_element_type=jnp.float32)
    return dx.astype(x2.dtype), dw_gu.astype(w_gate_up.dtype), dw_down


def matmul_grads(x2, dy, dgu, h, w_gate_up, w_down):
    """(dx, dw_gate_up, dw_down) from the SwiGLU gradient ``dgu`` [N, 2, f] and the rebuilt ``h`` [N, f]: the
    backward's three matmuls after ``dh``, in ``x2``'s dtype with float32 accumulation."""
    d, two, f = w_gate_up.shape
    dw_down = dot_rounded(h.T, dy, w_down.dtype)
    dgu = dgu.reshape(-1, two * f)  # [N, 2f]
    dx = dot_rounded(dgu, w_gate_up.reshape(d, two * f).T, x2.dtype)
    dw_gu = dot_rounded(x2.T, dgu, w_gate_up.dtype).reshape(d, two, f)
    return dx, dw_gu, dw_down


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def mlp(x, w_gate_up, w_down, *, gate_up_f32: bool = True, tp_safe: bool = False):
    lead = x.shape[:-1]
    out = _mlp(x.reshape(-1, x.shape[-1]), w_gate_up, w_down, bool(gate_up_f32), bool(tp_safe))
    return out.reshape(*lead, w_down.shape[1])


def mlp_tp(x, w_gate_up, w_down):
    """``mlp`` with ``tp_safe=True``: 3-D einsums that keep a tensor-sharded ``f`` axis sharded (no weight
    all-gather). Registered as ``fused_tp``; not yet timed on a GPU."""
    return mlp(x, w_gate_up, w_down, tp_safe=True)
