"""Sharded parameters and optimizer states (FSDP / ZeRO-3 layouts)."""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallax.sharding.rules import named_sharding


def param_shardings(logical_names, mesh):
    """Tree of NamedShardings from a tree of logical-name tuples (tuples are leaves)."""
    return jax.tree.map(
        lambda names: named_sharding(mesh, names),
        logical_names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def shard_params(params, logical_names, mesh):
    """Places ``params`` according to their logical names."""
    return jax.device_put(params, param_shardings(logical_names, mesh))


def init_optimizer_state(optimizer: optax.GradientTransformation, params, mesh=None):
    """``optimizer.init(params)`` with every param-shaped state sharded like its param.

    ``mesh`` (for the replicated non-param states such as step counts) defaults
    to the mesh of the first parameter's sharding.

    Without this, jit would leave Adam moments replicated: 2x the parameter
    memory on every device, defeating FSDP.
    """
    abstract_state = jax.eval_shape(optimizer.init, params)
    shardings = jax.tree.map(lambda p: p.sharding, params)
    mesh = mesh if mesh is not None else jax.tree.leaves(shardings)[0].mesh
    state_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state,
        shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    return jax.jit(optimizer.init, out_shardings=state_shardings)(params)
