"""Probe: does chunking the offloaded Adam update let XLA overlap host->device and device->host copies?"""
import sys, time
from functools import partial
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

L, R, C = 32, 8192, 12288
dev = jax.devices()[0]
D = SingleDeviceSharding(dev)
H = D.with_memory_kind("pinned_host")
b1, b2, lr, eps = 0.9, 0.95, 1e-4, 1e-8


def adam(p, m, v, g):
    g = g.astype(jnp.float32)
    m = b1 * m.astype(jnp.float32) + (1 - b1) * g
    v = b2 * v.astype(jnp.float32) + (1 - b2) * g * g
    p = p - lr * m / (jnp.sqrt(v) + eps)
    return p, m.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


def timeit(name, f, args, n=4):
    try:
        c = f.lower(*args).compile()
    except Exception as e:  # noqa
        print(f"{name}: compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True); return args
    ma = c.memory_analysis()
    out = c(*args); jax.block_until_ready(out); args = (out[0], out[1], out[2], args[3])
    t = time.perf_counter()
    for _ in range(n):
        out = c(*args); args = (out[0], out[1], out[2], args[3])
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t) / n
    print(f"{name}: {dt*1e3:8.1f} ms per update  temp {ma.temp_size_in_bytes/2**30:.2f} GiB "
          f"out {ma.output_size_in_bytes/2**30:.2f} GiB", flush=True)
    return args


def whole(p, m, v, g):
    m = jax.device_put(m, jax.memory.Space.Device); v = jax.device_put(v, jax.memory.Space.Device)
    return adam(p, m, v, g)


def make_lists(K):
    n = L // K
    def f(p, ms, vs, g):
        ps, mo, vo = [], [], []
        for c in range(K):
            sl = slice(c * n, (c + 1) * n)
            mc = jax.device_put(ms[c], jax.memory.Space.Device); vc = jax.device_put(vs[c], jax.memory.Space.Device)
            pc, mc, vc = adam(p[sl], mc, vc, g[sl])
            ps.append(pc); mo.append(mc); vo.append(vc)
        return jnp.concatenate(ps), mo, vo
    return f


def make_dus(K):
    n = L // K
    def f(p, m, v, g):
        for c in range(K):
            sl = slice(c * n, (c + 1) * n)
            mc = jax.device_put(m[sl], jax.memory.Space.Device); vc = jax.device_put(v[sl], jax.memory.Space.Device)
            pc, mc, vc = adam(p[sl], mc, vc, g[sl])
            p = p.at[sl].set(pc)
            m = m.at[sl].set(jax.device_put(mc, jax.memory.Space.Host))
            v = v.at[sl].set(jax.device_put(vc, jax.memory.Space.Host))
        return p, m, v
    return f


def main():
    key = jax.random.PRNGKey(0)
    p = jax.device_put(jnp.zeros((L, R, C), jnp.float32), D)
    g = jax.device_put(jax.random.normal(key, (L, R, C), jnp.bfloat16), D)
    m = jax.device_put(jnp.zeros((L, R, C), jnp.bfloat16), H)
    v = jax.device_put(jnp.zeros((L, R, C), jnp.bfloat16), H)
    print("moments", m.nbytes / 2**30, "GiB each, on", m.sharding.memory_kind, flush=True)

    # raw bandwidth
    t = time.perf_counter(); x = jax.device_put(m, D); x.block_until_ready(); dt = time.perf_counter() - t
    print(f"H2D {m.nbytes/dt/1e9:.1f} GB/s", flush=True)
    t = time.perf_counter(); y = jax.device_put(x, H); y.block_until_ready(); dt = time.perf_counter() - t
    print(f"D2H {m.nbytes/dt/1e9:.1f} GB/s", flush=True); del x, y

    f = jax.jit(whole, in_shardings=(D, H, H, D), out_shardings=(D, H, H), donate_argnums=(0, 1, 2))
    p, m, v, g = timeit("whole", f, (p, m, v, g))
    for K in (4, 8, 16):
        f = jax.jit(make_dus(K), in_shardings=(D, H, H, D), out_shardings=(D, H, H), donate_argnums=(0, 1, 2))
        p, m, v, g = timeit(f"dus K={K}", f, (p, m, v, g))
    m_arr, v_arr = m, v
    for K in (4, 8, 16):
        n = L // K
        ms = [jax.device_put(m_arr[c*n:(c+1)*n], H) for c in range(K)]
        vs = [jax.device_put(v_arr[c*n:(c+1)*n], H) for c in range(K)]
        f = jax.jit(make_lists(K), in_shardings=(D, [H]*K, [H]*K, D), out_shardings=(D, [H]*K, [H]*K),
                    donate_argnums=(0, 1, 2))
        p, ms, vs, g = timeit(f"lists K={K}", f, (p, ms, vs, g))
        del ms, vs


if __name__ == "__main__":
    main()
