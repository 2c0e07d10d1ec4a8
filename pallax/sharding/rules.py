"""Logical axis names -> mesh axes.

Parameters and activations are annotated with logical names; one rule table
maps them to the mesh. The default implements, all at once:

* DP + FSDP: the batch over ``(data, fsdp)``; parameters' ``embed`` dimension
  over ``fsdp`` (ZeRO-3: parameters, gradients and optimizer states sharded,
  gathered per layer inside the step).
* Megatron TP: ``heads``/``kv_heads``/``mlp``/``vocab`` over ``tensor`` (QKV
  and up/gate projections column-parallel, output and down projections
  row-parallel).
* Sequence parallelism: activations' ``length`` over ``sequence``.

Activations use their own names (``act_*``) so that, e.g., the batch can take
``fsdp`` while parameters' ``embed`` also does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

from pallax.sharding.mesh import AXES, DATA, FSDP, SEQUENCE, TENSOR

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # Parameters.
    ("embed", FSDP),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),
    ("vocab", TENSOR),
    ("norm", None),
    # Activations.
    ("batch", (DATA, FSDP)),
    ("length", SEQUENCE),
    ("act_embed", None),
    ("act_heads", TENSOR),
    ("act_kv_heads", TENSOR),
    ("act_mlp", TENSOR),
    ("act_vocab", TENSOR),
    ("cache_length", None),
)

_state = threading.local()


def current_rules() -> Rules:
    return getattr(_state, "rules", DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Rules | dict):
    """Overrides the rule table within the context; unknown mesh axes are rejected."""
    rules = tuple(rules.items()) if isinstance(rules, dict) else tuple(rules)
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"each rule must be a (logical_name, mesh_axis or tuple of axes or None) "
                f"pair, got {rule!r}"
            )
        name, target = rule
        targets = target if isinstance(target, tuple) else (target,)
        if not all(t is None or isinstance(t, str) for t in targets):
            raise ValueError(f"rule {name!r} -> {target!r}: targets must be axis names or None")
        bad = [t for t in targets if t is not None and t not in AXES]
        if bad:
            raise ValueError(f"rule {name!r} -> {target!r} names unknown mesh axes {bad}")
    previous = current_rules()
    # Later entries override earlier ones; keep defaults for names not given.
    given = dict(rules)
    _state.rules = tuple((n, given.pop(n, t)) for n, t in previous) + tuple(given.items())
    try:
        yield
    finally:
        _state.rules = previous


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> P:
    """PartitionSpec for logical dimension names; a mesh axis is used at most once."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        raise ValueError(f"names must be a tuple of logical axis names, got {names!r}")
    table = dict(current_rules() if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in table:
            raise ValueError(f"no sharding rule for logical axis {name!r} (rules: {list(table)})")
        target = None if name is None else table[name]
        targets = target if isinstance(target, tuple) else (target,)
        free = tuple(t for t in targets if t is not None and t not in used)
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else free)
    return P(*spec)


def named_sharding(mesh, names: Sequence[str | None]) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, logical_to_spec(names))


def shard_as(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the current mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def validate_layout(
    mesh,
    *,
    num_heads: int,
    num_kv_heads: int,
    seq_len: int | None = None,
    sequence_method: str | None = None,
    mlp_dim: int | None = None,
    vocab_size: int | None = None,
) -> None:
    """Raises ValueError at configuration time when a model cannot use this mesh."""
    tensor, sequence = mesh.shape[TENSOR], mesh.shape[SEQUENCE]
    for name, size in (
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("mlp_dim", mlp_dim),
        ("vocab_size", vocab_size),
    ):
        if size is not None and size % tensor:
            raise ValueError(f"{name}={size} is not divisible by the tensor axis ({tensor})")
    if seq_len is not None and seq_len % sequence:
        raise ValueError(f"seq_len={seq_len} is not divisible by the sequence axis ({sequence})")
    if sequence > 1 and sequence_method == "ulysses":
        for name, size in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if size % (tensor * sequence):
                raise ValueError(
                    f"Ulysses needs {name}={size} divisible by tensor x sequence "
                    f"({tensor} x {sequence})"
                )
    if sequence_method not in (None, "ulysses", "ring", "halo"):
        raise ValueError(
            f"sequence_method must be 'ulysses', 'ring' or 'halo', got {sequence_method!r}"
        )
