"""Orbax checkpoints of models (dense, sparse, quantized) and optimizer states.

A checkpoint directory holds one sub-directory per saved step with three items:
``params`` and ``opt_state`` (flat ``{path: array}`` dicts, saved sharded: each
process writes its own shards) and ``meta`` (JSON: the training config, the
step, and a description of every non-dense weight so that sparse / quantized
models, whose array shapes depend on the data, can be rebuilt abstractly and
restored straight onto a mesh).

Saves are asynchronous and atomic: Orbax writes into a temporary directory and
renames it once every process has finished, so a run killed mid-save leaves
the previous step as the latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from pallax._checks import check_int
from pallax.models import Transformer, linears, logical_shardings, shard_model
from pallax.pallas_kernels import QuantizedWeight, SparseWeight
from pallax.pallas_kernels.sparse import SparseShards

_WEIGHT_TYPES = {cls.__name__: cls for cls in (QuantizedWeight, SparseWeight, SparseShards)}


def describe(value) -> Any:
    """JSON description of a (possibly nested) weight pytree: shapes, dtypes, statics."""
    if value is None:
        return None
    if type(value).__name__ in _WEIGHT_TYPES:
        return {
            "type": type(value).__name__,
            "fields": {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return {"shape": list(value.shape), "dtype": str(value.dtype)}
    return {"static": value}


def abstract(description) -> Any:
    """Inverse of :func:`describe` with ``jax.ShapeDtypeStruct`` leaves."""
    if description is None:
        return None
    if "type" in description:
        fields = {k: abstract(v) for k, v in description["fields"].items()}
        return _WEIGHT_TYPES[description["type"]](**fields)
    if "static" in description:
        return description["static"]
    return jax.ShapeDtypeStruct(tuple(description["shape"]), jnp.dtype(description["dtype"]))


def weight_descriptions(model: Transformer) -> dict[str, Any]:
    """``{linear path: {"weight": description, "act_bits": ...}}`` for non-dense linears."""
    return {
        path: {"weight": describe(layer.kernel.get_value()), "act_bits": layer.act_bits}
        for path, layer in linears(model)
        if not isinstance(layer.kernel.get_value(), jax.Array | jax.ShapeDtypeStruct)
    }


def abstract_model(config, weights: dict[str, Any] | None = None) -> Transformer:
    """A Transformer of ShapeDtypeStructs, with the recorded sparse / quantized weights."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    by_path = dict(linears(model))
    for path, spec in (weights or {}).items():
        if path not in by_path:
            raise ValueError(f"checkpoint weight {path!r} is not a linear of this model")
        by_path[path].kernel.set_value(abstract(spec["weight"]))
        by_path[path].act_bits = spec["act_bits"]
    return model


def flatten(tree) -> dict[str, Any]:
    """``{"blocks/0/mlp/up_proj/kernel/values": leaf, ...}`` (Orbax-friendly keys)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = "/".join(
            str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path
        )
        flat[key] = leaf
    return flat


def unflatten(template, flat: dict[str, Any]):
    """Puts the values of ``flat`` (keys from :func:`flatten`) into ``template``'s structure."""
    keys = list(flatten(template))
    missing = [k for k in keys if k not in flat]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} array(s), e.g. {missing[:3]}")
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [flat[k] for k in keys])


def params_target(model: Transformer, mesh=None):
    """Abstract param state (with target shardings) for restoring into ``model``'s structure.

    Dense weights land directly in their mesh layout; sparse / quantized ones
    are restored replicated and repartitioned by :func:`shard_model`.
    """
    state = nnx.state(model, nnx.Param)
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state, is_leaf=is_variable)
    else:  # replicated for sparse / quantized weights
        shardings = logical_shardings(model, mesh)

    def target(variable, sharding):
        place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
        return variable.replace(jax.tree.map(place, variable.get_value()))

    return jax.tree.map(target, state, shardings, is_leaf=is_variable)


class Checkpointer:
    """Periodic async checkpoints in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, save_every: int = 0):
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=True, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save of step ``step`` (when due, or ``force``)."""
        if not force and (not self.save_every or step % self.save_every):
            return False
        items = dict(
            params=ocp.args.StandardSave(flatten(params)),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        if opt_state is not None:  # converted models have no optimizer state
            items["opt_state"] = ocp.args.StandardSave(flatten(opt_state))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def meta(self, step: int | None = None) -> dict:
        step = self._require(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int | None, params_template, opt_template=None):
        """Restores ``(params, opt_state, meta)``; ``opt_template=None`` skips the optimizer."""
        step = self._require(step)
        items = dict(
            params=ocp.args.StandardRestore(flatten(params_template)),
            meta=ocp.args.JsonRestore(),
        )
        if opt_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(flatten(opt_template))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        params = unflatten(params_template, restored["params"])
        opt_state = (
            unflatten(opt_template, restored["opt_state"]) if opt_template is not None else None
        )
        return params, opt_state, restored["meta"]

    def _require(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint{'' if step is None else f' for step {step}'} "
                f"in {str(self.directory)!r}"
            )
        return step

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def _user_errors(read, what: str):
    """``read()``, with Orbax / tensorstore failures on damaged files (bare
    JSONDecodeErrors, ValueErrors from deep inside) reported as naming ``what``."""
    try:
        return read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot read {what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint raises many types
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {what} (damaged checkpoint?): {message}") from None


def load_model(directory: str | Path, step: int | None = None, *, mesh=None):
    """``(model, meta)`` from a checkpoint written by :mod:`pallax.train` or
    ``pallax convert``; with ``mesh`` the parameters are restored sharded."""
    from pallax.train.config import from_dict  # avoid a cycle at import time

    directory = Path(directory)
    if not directory.is_dir():  # Checkpointer would create it
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} not found")
    if step is not None:
        check_int("step", step, minimum=0)
    checkpointer = Checkpointer(directory)
    try:
        step = checkpointer._require(step)
        where = str(directory / str(step))
        meta = _user_errors(lambda: checkpointer.meta(step), f"metadata of {where!r}")
        if not isinstance(meta, dict) or not {"config", "step"} <= set(meta):
            raise ValueError(f"checkpoint {where!r}: metadata lacks 'config' or 'step'")
        try:
            config = from_dict(meta["config"])
            model = abstract_model(config.model, meta.get("weights"))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"checkpoint {where!r}: bad metadata: {e}") from None
        target = params_target(model, mesh)
        params, _, meta = _user_errors(
            lambda: checkpointer.restore(meta["step"], target), f"parameters of {where!r}"
        )
    finally:
        checkpointer.close()
    graphdef, _ = nnx.split(model)
    model = nnx.merge(graphdef, params)
    if mesh is not None and meta.get("weights"):
        shard_model(model, mesh)
    elif mesh is None:  # tensor-parallel sparse shards: one weight again
        for _, layer in linears(model):
            if isinstance(layer.kernel.get_value(), SparseShards):
                layer.kernel.set_value(layer.kernel.get_value().merge())
    return model, meta
