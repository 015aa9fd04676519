"""A Pallas kernel called by several identical layers is lowered once per program (pallas_kernels/_lowering.py):
its lowering is ~1.2 s of Python per call site on the GPU, 119 s of the 1B preset's start before this. The programs
are lowered for CUDA on the CPU, as the GPU would lower them (the CPU tests' interpret mode runs without the jit
boundary)."""

import re

import jax
import jax.numpy as jnp

from pallas_kernels.attention import mosaic_gpu as attention_mgpu
from pallas_kernels.mlp import mosaic_gpu as mlp_mgpu

LAYERS = 3


def _definitions_and_calls(fn, *shapes) -> dict:
    """{kernel function: (times it is defined in the module lowered for CUDA, times it is called)}."""
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    names = re.findall(r"func\.func private @(\w+)\(", text)
    stems = {re.sub(r"_\d+$", "", name) for name in names}
    return {stem: (sum(re.sub(r"_\d+$", "", n) == stem for n in names),
                   len(re.findall(rf"call @{stem}(?:_\d+)?\(", text))) for stem in stems}


def test_attention_kernels_of_identical_layers_are_lowered_once():
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)

    def loss(q, kv):
        for _ in range(LAYERS):
            q = attention_mgpu.attention(q, kv, kv)
        return q.astype(jnp.float32).sum()

    found = _definitions_and_calls(jax.grad(loss, argnums=(0, 1)), q, kv)
    for kernel in ("_forward", "_backward_dq", "_backward_dkv"):
        assert found.get(kernel) == (1, LAYERS), (kernel, found)


def test_mlp_kernel_of_identical_layers_is_lowered_once():
    x = jax.ShapeDtypeStruct((2048, 512), jnp.bfloat16)
    w_gate_up = jax.ShapeDtypeStruct((512, 2, 1024), jnp.bfloat16)
    w_down = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    assert mlp_mgpu.supported(2048, 512, 1024, dtype=jnp.bfloat16)  # the kernel, not the fallback

    def forward(x, w_gate_up, w_down):
        for _ in range(LAYERS):
            x = mlp_mgpu.mlp(x, w_gate_up, w_down)
        return x

    assert _definitions_and_calls(forward, x, w_gate_up, w_down).get("_swiglu_gate_up") == (1, LAYERS)
