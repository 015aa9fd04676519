"""A Pallas kernel called by several identical layers is lowered once per program (pallas_kernels/_lowering.py):
its lowering is ~1.2 s of Python per call site on the GPU, 119 s of the 1B preset's start before this."""

import re

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.attention import mosaic_gpu as attention_mgpu
from pallas_kernels.mlp import mosaic_gpu as mlp_mgpu

LAYERS = 3


def _definitions_and_calls(fn, *args) -> dict:
    """{kernel function: (times it is defined in the lowered module, times it is called)}."""
    text = jax.jit(fn).lower(*args).as_text()
    names = re.findall(r"func\.func private @(\w+)\(", text)
    stems = {re.sub(r"_\d+$", "", name) for name in names}
    return {stem: (sum(re.sub(r"_\d+$", "", n) == stem for n in names),
                   len(re.findall(rf"call @{stem}(?:_\d+)?\(", text))) for stem in stems}


def test_attention_kernels_of_identical_layers_are_lowered_once():
    config = attention_mgpu.Config(block_q=64, block_kv=64, max_concurrent_steps=2)
    q = jnp.ones((1, 256, 4, 64), jnp.bfloat16)
    kv = jnp.ones((1, 256, 2, 64), jnp.bfloat16)

    def loss(q, kv):
        for _ in range(LAYERS):
            q = attention_mgpu.attention(q, kv, kv, config=config, interpret=True)
        return q.astype(jnp.float32).sum()

    found = _definitions_and_calls(jax.grad(loss, argnums=(0, 1)), q, kv)
    for kernel in ("_forward", "_backward_dq", "_backward_dkv"):
        assert found.get(kernel) == (1, LAYERS), (kernel, found)


def test_mlp_kernel_of_identical_layers_is_lowered_once():
    config = mlp_mgpu.SwiGLUConfig(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=2, epi_tile_m=64,
                                   grid_tile_width=2)
    x = jnp.ones((256, 128), jnp.bfloat16)
    w_gate_up = jnp.ones((128, 2, 256), jnp.bfloat16)
    w_down = jnp.ones((256, 128), jnp.bfloat16)

    def forward(x):
        for _ in range(LAYERS):
            x = mlp_mgpu.mlp(x, w_gate_up, w_down, config=config, interpret=plgpu.InterpretGPUParams())
        return x

    assert _definitions_and_calls(forward, x).get("_swiglu_gate_up") == (1, LAYERS)
