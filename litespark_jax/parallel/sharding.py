"""Shardings of the train state, derived from the logical axes the model puts on every parameter."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from litespark_jax.parallel.logical import logical_to_spec
from litespark_jax.parallel.mesh import DEFAULT_RULES


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding per parameter, from its ``logical_axes`` metadata."""

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * variable[...].ndim
        return NamedSharding(mesh, logical_to_spec(axes, rules))

    return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params, params_sharding, mesh: Mesh):
    """Moments shard like their parameters; counters and other scalars are replicated."""
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
