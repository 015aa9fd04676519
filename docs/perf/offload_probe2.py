"""Probe 2: per-chunk update dispatched from Python, copies issued with device_put (async): do H2D and D2H overlap?"""
import time
import jax, jax.numpy as jnp

from offload_probe import C, D, H, L, R, adam  # the same shapes and update as probe 1

adam_d = jax.jit(adam, donate_argnums=(0, 1, 2))

for K in (8, 16, 32):
    n = L // K
    key = jax.random.PRNGKey(0)
    ps = [jax.device_put(jnp.zeros((n, R, C), jnp.float32), D) for _ in range(K)]
    gs = [jax.device_put(jax.random.normal(key, (n, R, C), jnp.bfloat16), D) for _ in range(K)]
    ms = [jax.device_put(jnp.zeros((n, R, C), jnp.bfloat16), H) for _ in range(K)]
    vs = [jax.device_put(jnp.zeros((n, R, C), jnp.bfloat16), H) for _ in range(K)]
    jax.block_until_ready((ps, gs, ms, vs))

    def one_pass(sync):
        for c in range(K):
            mc = jax.device_put(ms[c], D); vc = jax.device_put(vs[c], D)
            ps[c], mc, vc = adam_d(ps[c], mc, vc, gs[c])
            ms[c] = jax.device_put(mc, H); vs[c] = jax.device_put(vc, H)
            if sync:
                jax.block_until_ready((ms[c], vs[c]))
        jax.block_until_ready((ps, ms, vs))

    for sync in (False, True, False):
        one_pass(sync)
        t = time.perf_counter()
        for _ in range(3):
            one_pass(sync)
        print(f"K={K} {'serial' if sync else 'async '}: {(time.perf_counter() - t) / 3 * 1e3:7.1f} ms per update",
              flush=True)
    del ps, gs, ms, vs
