"""The training step with the Adam moments in host memory (``optim.offload_state``), streamed one parameter at a time.

One jitted step that reads host-resident moments moves them all to the device and then all back, one direction after
the other. Here the step is a gradient program and then one small update program per parameter, dispatched from
Python: each parameter's moments are copied in with ``jax.device_put`` while the previous parameter updates and its
new moments are copied out, so the two directions overlap. Largest parameters go first, so the last copy out, which
nothing hides, is a small one. Llama-2-7B on one H100: 1.56 s per step instead of 1.86 (docs/PERFORMANCE.md).

The update is the optimizer's own (``optimizer.elementwise_optimizer``) on one parameter at a time, with the global
gradient-norm clipping done by a norm the gradient program computes once: parameters, moments and metrics equal those
of ``step.make_train_step`` to float32 rounding (tests/train/test_offload.py). On a GPU, where XLA may skip a bf16
rounding between two float32 values inside one program, bf16 gradients (``cast_weights_once``) are rounded here as
their dtype says and there perhaps not.
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from litespark_jax.config import OptimConfig
from litespark_jax.train.optimizer import (build_optimizer, elementwise_optimizer, elementwise_state,
                                          with_elementwise_state)
from litespark_jax.train.state import TrainState
from litespark_jax.train.step import mean_gradients, step_from_gradients, step_scalars

DEVICE_MEMORY = "device"


class StreamedOffloadStep:
    """``step(state, batch) -> (state, metrics)`` for a state whose moments live in pinned host memory.

    ``gradients`` is a ``make_gradients``-style function; ``state_sharding`` the TrainState of shardings the moments
    have on the host (``state.state_shardings(..., offload_opt_state=True)``). At most ``in_flight`` earlier
    parameters' new moments are on their way to the host while one parameter updates and the next one's come in.
    The device peak is at the first (largest) parameter's update: all parameters and gradients, and the two largest
    parameters' moments (``plan.memory_model``'s ``update_moments``).

    Like a jitted step's donated argument, the state passed in is spent, also when the step raises: its parameters
    are donated and its host moments deleted once their new values have reached the host. Otherwise the pinned host
    memory holds two copies of the moments, which on the 7B slowed the step from 1.55 to 3.6-4.0 s.
    """

    def __init__(self, gradients: Callable, optim_cfg: OptimConfig, total_steps: int, state_sharding: TrainState,
                 batch_sharding, schedule: optax.Schedule | None = None, compiler_options: dict | None = None,
                 in_flight: int = 2):
        self.optim_cfg = optim_cfg
        self.in_flight = max(1, in_flight)
        self._full = build_optimizer(optim_cfg, total_steps)
        self._elementwise = elementwise_optimizer(optim_cfg, total_steps)
        # In the order of the state's leaves (the sharding trees hold a sharding where the state holds an array).
        self._param_shardings = jax.tree.leaves(state_sharding.params)
        self._opt_shardings = jax.tree.leaves(state_sharding.opt_state)
        mesh = self._param_shardings[0].mesh
        self._replicated = replicated = NamedSharding(mesh, PartitionSpec())

        def grad_program(params, step, batch):
            grad_sums, denominator, metrics = gradients(params, batch)
            grads = mean_gradients(grad_sums, denominator, params)
            metrics = {**metrics, **step_scalars(step, grads, metrics, schedule)}
            return grad_sums, denominator, metrics

        self._grad_program = jax.jit(
            grad_program, in_shardings=(state_sharding.params, state_sharding.step, batch_sharding),
            out_shardings=(state_sharding.params, replicated, replicated), compiler_options=compiler_options)
        self._grad_call = self._grad_program  # or its Compiled, after compile()
        self._compiler_options = compiler_options
        self._update_programs: dict[int, Callable] = {}  # jitted
        self._update_calls: dict[int, Callable] = {}  # what the step runs: jitted, or Compiled after compile()
        self._moment_slots: list[list[int]] | None = None  # per parameter: the positions of its moments
        self._order: list[int] | None = None

    # -- structure ----------------------------------------------------------------------------------------------

    def _layout(self, state: TrainState) -> None:
        """Which flat optimizer-state leaves are each parameter's moments, and the order parameters update in."""
        if self._order is not None:
            return
        self._param_def = jax.tree.structure(state.params)  # the state's own trees: nnx Params and all
        self._opt_def = jax.tree.structure(state.opt_state)
        self._param_avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(state.params)]
        self._opt_avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(state.opt_state)]
        n = len(self._param_shardings)
        if self._param_def.num_leaves != n or self._opt_def.num_leaves != len(self._opt_shardings):
            raise ValueError("the state's trees do not match the shardings the step was built for")
        index_tree = jax.tree.unflatten(self._param_def, list(range(n)))
        marks = optax.tree_map_params(self._full, lambda _, i: i, state.opt_state, index_tree,
                                      transform_non_params=lambda _: -1,
                                      is_leaf=lambda x: isinstance(x, nnx.Variable))
        marks = jax.tree.leaves(marks)
        self._moment_slots = [[k for k, m in enumerate(marks) if m == i] for i in range(n)]
        self._scalar_slots = [k for k, m in enumerate(marks) if m == -1]
        nbytes = lambda aval: math.prod(aval.shape) * aval.dtype.itemsize
        moment_bytes = [sum(nbytes(self._opt_avals[k]) for k in slots) for slots in self._moment_slots]
        self._order = sorted(range(n), key=lambda i: -moment_bytes[i])

    def _update_program(self, i: int) -> Callable:
        """The jitted update of parameter ``i`` alone: ``(param, grad_sum, moments, scalars, denominator, grad_norm,
        nonfinite) -> (param, moments, scalars)``, the param and the moments donated."""
        if i in self._update_programs:
            return self._update_programs[i]
        cfg = self.optim_cfg
        slots, scalar_slots = self._moment_slots[i], self._scalar_slots

        def update(param, grad_sum, moments, scalars, denominator, grad_norm, nonfinite):
            grad = mean_gradients(grad_sum, denominator, param)
            if cfg.grad_clip > 0:  # optax.clip_by_global_norm's arithmetic, with the norm of all the gradients
                trigger = jnp.squeeze(grad_norm < cfg.grad_clip)
                grad = jax.lax.select(trigger, grad, (grad / grad_norm.astype(grad.dtype)) * cfg.grad_clip)
            # Every other parameter is an empty array: the elementwise transforms do nothing for them.
            empty = lambda aval: jnp.zeros((0,), aval.dtype)
            only_i = lambda x: jax.tree.unflatten(
                self._param_def, [x if j == i else empty(aval) for j, aval in enumerate(self._param_avals)])
            params, grads = only_i(param), only_i(grad)
            opt_leaves = [empty(aval) for aval in self._opt_avals]
            for k, m in zip(slots, moments):
                opt_leaves[k] = m
            for k, s in zip(scalar_slots, scalars):
                opt_leaves[k] = s
            opt_state = jax.tree.unflatten(self._opt_def, opt_leaves)
            updates, new_state = self._elementwise.update(grads, elementwise_state(cfg, opt_state), params)
            new_param = optax.apply_updates(param, jax.tree.leaves(updates)[i])
            new_leaves = jax.tree.leaves(with_elementwise_state(cfg, opt_state, new_state))
            new_moments = [new_leaves[k] for k in slots]
            new_scalars = [new_leaves[k] for k in scalar_slots]
            finite = nonfinite == 0  # the guard of step.apply_update: a non-finite step changes nothing
            keep = lambda new, old: jnp.where(finite, new, old)
            return (keep(new_param, param), [keep(a, b) for a, b in zip(new_moments, moments)],
                    [keep(a, b) for a, b in zip(new_scalars, scalars)])

        param_sharding = self._param_shardings[i]
        moment_shardings = [self._opt_shardings[k].with_memory_kind(DEVICE_MEMORY) for k in slots]
        scalar_shardings = [self._opt_shardings[k] for k in scalar_slots]
        program = jax.jit(update, donate_argnums=(0, 2),
                          in_shardings=(param_sharding, param_sharding, moment_shardings, scalar_shardings,
                                        self._replicated, self._replicated, self._replicated),
                          out_shardings=(param_sharding, moment_shardings, scalar_shardings),
                          compiler_options=self._compiler_options)
        self._update_programs[i] = program
        return program

    # -- the step -----------------------------------------------------------------------------------------------

    def compile(self, state: TrainState, batch):
        """Compile the gradient program and every update program ahead of the first step, which then runs them;
        returns the gradient program's ``Compiled``. Its ``memory_analysis()`` covers the gradients' phase; the
        updates' peak after it is the class docstring's."""
        self._layout(state)
        self._grad_call = self._grad_program.lower(state.params, state.step, batch).compile()
        grad_sums, denominator, metrics = jax.eval_shape(self._grad_program, state.params, state.step, batch)
        opt_leaves = jax.tree.leaves(state.opt_state)
        scalars = [opt_leaves[k] for k in self._scalar_slots]
        for i, (param, grad) in enumerate(zip(jax.tree.leaves(state.params), jax.tree.leaves(grad_sums))):
            moments = [jax.ShapeDtypeStruct(opt_leaves[k].shape, opt_leaves[k].dtype,
                                            sharding=self._opt_shardings[k].with_memory_kind(DEVICE_MEMORY))
                       for k in self._moment_slots[i]]
            self._update_calls[i] = self._update_program(i).lower(
                param, grad, moments, scalars, denominator, metrics["grad_norm"], metrics["nonfinite"]).compile()
        return self._grad_call

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        self._layout(state)
        grad_sums, denominator, metrics = self._grad_call(state.params, state.step, batch)
        # The moments' device copies are allocated once the gradient program's temporaries are free (asked for
        # while it runs, the 7B's step took 1.59 s instead of 1.55).
        jax.block_until_ready(grad_sums)
        grad_sums = jax.tree.leaves(grad_sums)
        params = jax.tree.leaves(state.params)
        opt_leaves = list(jax.tree.leaves(state.opt_state))
        old_host = list(opt_leaves)
        scalars = [opt_leaves[k] for k in self._scalar_slots]
        new_scalars = scalars

        def fetch(i):
            slots = self._moment_slots[i]
            return jax.device_put([opt_leaves[k] for k in slots],
                                  [self._opt_shardings[k].with_memory_kind(DEVICE_MEMORY) for k in slots])

        coming = fetch(self._order[0])
        leaving = collections.deque()
        for position, i in enumerate(self._order):
            moments = coming
            if position + 1 < len(self._order):
                coming = fetch(self._order[position + 1])
            update = self._update_calls.get(i) or self._update_program(i)
            params[i], new_moments, new_scalars = update(
                params[i], grad_sums[i], moments, scalars, denominator, metrics["grad_norm"], metrics["nonfinite"])
            grad_sums[i] = moments = None  # free the device copies once the update is done with them
            slots = self._moment_slots[i]
            host = jax.device_put(new_moments, [self._opt_shardings[k] for k in slots])
            for k, x in zip(slots, host):
                opt_leaves[k] = x
            leaving.append((i, host))
            if len(leaving) > self.in_flight:
                j, done = leaving.popleft()
                jax.block_until_ready(done)
                for k in self._moment_slots[j]:  # as a donated argument: the caller's old state is spent
                    old_host[k].delete()
        for k, x in zip(self._scalar_slots, new_scalars):
            opt_leaves[k] = x
        new_state = TrainState(step=state.step + 1, params=jax.tree.unflatten(self._param_def, params),
                               opt_state=jax.tree.unflatten(self._opt_def, opt_leaves))
        return new_state, metrics


def build_train_step(config, gradients: Callable, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule | None, state_sharding: TrainState, batch_sharding,
                     compiler_options: dict | None = None) -> Callable:
    """``step(state, global_batch) -> (state, metrics)`` from a ``step.make_gradients``-style function: one jitted
    program with the state donated, or with ``optim.offload_state`` the streamed step above."""
    if config.optim.offload_state:
        return StreamedOffloadStep(gradients, config.optim, config.train.steps, state_sharding, batch_sharding,
                                   schedule, compiler_options)
    return jax.jit(step_from_gradients(gradients, optimizer, schedule), in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0, compiler_options=compiler_options)


def compile_ahead(step: Callable, state: TrainState, batch):
    """Compile ``build_train_step``'s step before its first call: (what to call, XLA's memory analysis; for the
    streamed step, its gradient program's)."""
    if isinstance(step, StreamedOffloadStep):
        return step, step.compile(state, batch).memory_analysis()
    compiled = step.lower(state, batch).compile()
    return compiled, compiled.memory_analysis()
