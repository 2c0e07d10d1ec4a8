"""Meshes, logical-axis rules and shard_map wrappers for DP/FSDP/TP/SP."""

from pallax.sharding.comm_quant import (
    COMM_QUANT_MODES,
    CommQuant,
    FsdpWeight,
    parse_comm_quant,
)
from pallax.sharding.mesh import (
    AXES,
    BATCH_AXES,
    DATA,
    FSDP,
    SEQUENCE,
    TENSOR,
    initialize_distributed,
    make_mesh,
    parse_mesh_spec,
)
from pallax.sharding.parallel import attention, column_parallel, row_parallel, sparse_specs
from pallax.sharding.rules import (
    DEFAULT_RULES,
    axis_rules,
    logical_to_spec,
    named_sharding,
    shard_as,
    validate_layout,
)
from pallax.sharding.state import init_optimizer_state, param_shardings, shard_params

__all__ = [
    "AXES",
    "COMM_QUANT_MODES",
    "CommQuant",
    "FsdpWeight",
    "BATCH_AXES",
    "DATA",
    "DEFAULT_RULES",
    "FSDP",
    "SEQUENCE",
    "TENSOR",
    "attention",
    "axis_rules",
    "column_parallel",
    "init_optimizer_state",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "param_shardings",
    "parse_comm_quant",
    "parse_mesh_spec",
    "row_parallel",
    "shard_as",
    "shard_params",
    "sparse_specs",
    "validate_layout",
]
