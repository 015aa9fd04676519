"""GPU kernels for LiteSpark-JAX behind one small dispatch interface.

Every function takes ``impl="auto"`` (the fastest correct implementation for the platform and shape; the CPU
always gets the reference) or the name of one implementation. Each kernel lives in its own folder with its pure-JAX
reference beside the fast versions.
"""

from pallas_kernels.attention import attention
from pallas_kernels.cross_entropy import cross_entropy, cross_entropy_sum
from pallas_kernels.mlp import mlp
from pallas_kernels.rms_norm import rms_norm, rms_norm_and_skip

from pallas_kernels.tuned import use_table


def registries() -> dict:
    """Each kernel's implementation registry, by kernel name."""
    import importlib

    # The submodules, not the functions of the same names imported above.
    modules = [importlib.import_module(f"pallas_kernels.{name}")
               for name in ("attention", "cross_entropy", "mlp", "rms_norm")]
    found = [m.registry for m in modules] + [m.sum_registry for m in modules if hasattr(m, "sum_registry")]
    return {r.kernel: r for r in found}


__all__ = ["attention", "cross_entropy", "cross_entropy_sum", "mlp", "rms_norm", "rms_norm_and_skip", "registries",
           "use_table"]
