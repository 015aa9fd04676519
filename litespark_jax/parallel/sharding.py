"""Shardings of the train state, derived from the logical axes the model puts on every parameter."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from litespark_jax.errors import ConfigError
from litespark_jax.parallel.logical import logical_to_spec
from litespark_jax.parallel.mesh import DEFAULT_RULES


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding per parameter, from its ``logical_axes`` metadata."""

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * variable[...].ndim
        return NamedSharding(mesh, logical_to_spec(axes, rules))

    return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


HOST_MEMORY = "pinned_host"


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params, params_sharding, mesh: Mesh,
                        offload: bool = False):
    """Moments shard like their parameters (in pinned host memory with ``offload``); counters and other scalars are
    replicated on the devices."""
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    if offload:
        kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
        if HOST_MEMORY not in kinds:
            raise ConfigError(f"optim.offload_state=true needs {HOST_MEMORY} memory; "
                              f"{mesh.devices.flat[0].platform} devices have {', '.join(sorted(kinds))}")
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding.with_memory_kind(HOST_MEMORY) if offload else sharding,
        abstract_opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
