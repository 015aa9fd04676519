"""The training state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from litespark_jax.config import ModelConfig
from litespark_jax.model import Llama
from litespark_jax.parallel.mesh import DEFAULT_RULES
from litespark_jax.parallel.sharding import opt_state_shardings, param_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    """Optimizer steps taken (int32 scalar)."""
    params: nnx.State
    """Model parameters (float32 by default), the pure state of ``Llama``."""
    opt_state: optax.OptState
    """Optimizer moments and counters."""


def init_model(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Create a Llama and split it into its static graph and its parameter state."""
    model = Llama(cfg, rngs=nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model)
    return graphdef, params


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and the shapes of the parameters, without allocating them."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(params=0)))
    return nnx.split(model)


def state_shardings(optimizer: optax.GradientTransformation, abstract_params: nnx.State, mesh: Mesh,
                    rules=DEFAULT_RULES, offload_opt_state: bool = False) -> TrainState:
    """Where each part of the state lives: parameters by their logical axes, Adam moments like their parameters (in
    pinned host memory with ``offload_opt_state``), the step counter replicated."""
    params = param_shardings(abstract_params, mesh, rules)
    return TrainState(step=NamedSharding(mesh, PartitionSpec()), params=params,
                      opt_state=opt_state_shardings(optimizer, abstract_params, params, mesh, offload_opt_state))


def init_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    _, params = init_model(cfg, seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
