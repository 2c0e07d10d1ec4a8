"""Whole-model conversion passes: sparsify and quantize every selected Linear."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallax import sharding as ps
from pallax._checks import check_choice, check_finite, check_float, check_int
from pallax.models import transformer
from pallax.models.transformer import Linear
from pallax.pallas_kernels import activation_norms, lkd, quantize, sparsify
from pallax.pallas_kernels.second_order import (
    GPTQConfig,
    SparseGPTConfig,
    gptq,
    hessian,
    sparsegpt,
)

LayerFilter = Callable[[str, Linear], bool]


def linears(model: nnx.Module) -> list[tuple[str, Linear]]:
    """``(path, Linear)`` pairs, e.g. ``("blocks.0.mlp.up_proj", layer)``."""
    return [
        (".".join(str(p) for p in path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Linear)
    ]


def transformer_blocks_only(path: str, layer: Linear) -> bool:
    """Default selection: every projection inside the blocks, not the output head."""
    return path.startswith("blocks.")


def collect_linear_inputs(model: nnx.Module, tokens) -> dict[int, jnp.ndarray]:
    """Runs ``model(tokens)`` eagerly and returns each Linear's input ``[N, in]``."""
    transformer._captured_inputs = {}
    try:
        model(jnp.asarray(tokens, jnp.int32))
        captured = transformer._captured_inputs
    finally:
        transformer._captured_inputs = None
    return {
        key: jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs]).astype(jnp.float32)
        for key, xs in captured.items()
    }


def _calibration_inputs(model, method: str, needs_data: bool, calibration):
    """Per-Linear inputs for data-driven methods (None for data-free ones)."""
    if not needs_data:
        return None
    if calibration is None:
        raise ValueError(f"method={method!r} needs calibration tokens")
    tokens = np.asarray(calibration)
    vocab = model.config.vocab_size
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"calibration must be integer tokens [batch, seq], got {tokens.dtype}{tokens.shape}"
        )
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"calibration tokens must be in [0, vocab_size={vocab})")
    return collect_linear_inputs(model, calibration)


def _selected(model, layers: LayerFilter | None):
    layers = layers or transformer_blocks_only
    return [(path, layer) for path, layer in linears(model) if layers(path, layer)]


# Linears of a block in the order their inputs depend on each other: GPTQ and
# SparseGPT calibrate each group on the outputs of the groups already compressed.
BLOCK_GROUPS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _StopCapture(Exception):
    pass


class _Recorder(dict):
    """Linear inputs by ``id(layer)``; stops the forward pass (raises
    :class:`_StopCapture`) once every layer in ``wanted`` has been seen."""

    def __init__(self, wanted):
        super().__init__()
        self.wanted = set(wanted or ())

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = _Inputs(self)
        return self[key]


class _Inputs(list):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def append(self, x):
        super().append(x)
        if self.recorder.wanted and self.recorder.wanted <= self.recorder.keys():
            raise _StopCapture


def _capture(fn, *args, wanted=None):
    """Runs ``fn(*args)`` eagerly; returns its output and each Linear's inputs.
    With ``wanted`` (layer ids) it stops as soon as those have run (output None)."""
    transformer._captured_inputs = _Recorder(wanted)
    out = None
    try:
        out = fn(*args)
    except _StopCapture:
        pass
    finally:
        captured = transformer._captured_inputs
        transformer._captured_inputs = None
    return out, captured


def _calibration_tokens(calibration, method):
    if calibration is None:
        raise ValueError(f"method={method!r} needs calibration tokens [batch, seq]")
    tokens = calibration if hasattr(calibration, "sharding") else np.asarray(calibration)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"calibration must be integer tokens [batch, seq], got {tokens.dtype} {tokens.shape}"
        )
    return jnp.asarray(tokens, jnp.int32)


def sequential_compress(model: nnx.Module, calibration, compress, layers=None) -> nnx.Module:
    """Layer-sequential one-shot compression (GPTQ / SparseGPT style).

    Walks the blocks in order, keeping only one block's activations: each group
    of :data:`BLOCK_GROUPS` gets the Hessian of its inputs as they are with
    every earlier block and group already compressed, ``compress(weight,
    hessian) -> new weight`` replaces its selected Linears, and the compressed
    block's output feeds the next block. ``calibration``: tokens ``[batch,
    seq]`` (may be sharded over the mesh's batch axes). Selected Linears outside
    the blocks (the output head) are compressed last, on the final hidden states.
    """
    tokens = _calibration_tokens(calibration, "sequential_compress")
    selected = {id(layer): path for path, layer in _selected(model, layers)}
    c = model.config
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(model.embed.get_value(), tokens, axis=0).astype(c.dtype)
    x = ps.shard_as(x, ("batch", "length", "act_embed"))

    mesh = None if jax.sharding.get_abstract_mesh().empty else jax.sharding.get_mesh()

    def replace(layer, inputs):
        w = layer.kernel.get_value()
        if not isinstance(w, jax.Array):
            raise ValueError(
                f"{selected[id(layer)]} is already compressed ({type(w).__name__}); "
                "GPTQ / SparseGPT start from dense weights"
            )
        layer.kernel.set_value(compress(w, hessian(inputs)))

    for block in model.blocks:
        for group in BLOCK_GROUPS:
            members = [_submodule(block, name) for name in group]
            members = [layer for layer in members if id(layer) in selected]
            if not members:
                continue
            _, captured = _capture(block, x, positions, wanted=map(id, members))
            for layer in members:
                replace(layer, captured[id(layer)][0])
            if mesh is not None:  # the next forward runs the new weights tensor-parallel
                transformer.shard_model(model, mesh)
        x, _ = block(x, positions)
        x = ps.shard_as(x, ("batch", "length", "act_embed"))
    in_blocks = {id(layer) for _, layer in linears(model.blocks)}
    rest = [layer for _, layer in linears(model) if id(layer) in selected]
    rest = [layer for layer in rest if id(layer) not in in_blocks]
    if rest:
        hidden = model.final_norm(x)
        for layer in rest:
            replace(layer, hidden)
    return model


def _submodule(module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def sparsify_model(
    model: nnx.Module,
    sparsity: float = 0.5,
    method: str = "magnitude",
    *,
    calibration=None,
    pattern: str | None = None,
    layers: LayerFilter | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> nnx.Module:
    """Prunes the selected Linears in place and returns the model.

    ``method``: ``"magnitude"``; ``"wanda"`` (``|W| * ||X||``, one calibration
    pass); ``"sparsegpt"`` (second-order, layer-sequential, surviving weights
    updated; ``block_size`` and ``damp`` as in :class:`SparseGPTConfig`). The
    last two need ``calibration`` tokens ``[batch, seq]``. ``pattern="2:4"``
    keeps N of every M inputs instead of using ``sparsity``.
    """
    if pattern is None:
        check_float("sparsity", sparsity, minimum=0.0, maximum=1.0, open_max=True)
    check_choice("method", method, ("magnitude", "wanda", "sparsegpt"))
    if method == "sparsegpt":
        config = SparseGPTConfig(sparsity, pattern, block_size=block_size, damp=damp)
        _calibration_tokens(calibration, method)
        return sequential_compress(model, calibration, lambda w, h: sparsegpt(w, h, config), layers)
    selected = _selected(model, layers)
    inputs = _calibration_inputs(model, method, method == "wanda", calibration)
    for path, layer in selected:
        norms = activation_norms(inputs[id(layer)]) if inputs is not None else None
        w = _dense_weight(path, layer)
        layer.kernel.set_value(
            sparsify(w, sparsity, method, activation_norms=norms, pattern=pattern, name=path)
        )
    return model


def _dense_weight(path: str, layer: Linear):
    w = layer.kernel.get_value()
    if not isinstance(w, jax.Array):
        raise ValueError(f"{path} is already {type(w).__name__}: convert a dense model")
    return w


def default_symmetric(bits: int, act_bits: int | None = None) -> bool:
    """Zero points for 4-bit weights, symmetric for 8 bits (see README, "Compression
    quality on a real model": asymmetric W4 g128 rounding loses far less)."""
    return bits == 8 or act_bits is not None


def quantize_model(
    model: nnx.Module,
    bits: int = 8,
    act_bits: int | None = None,
    method: str = "rtn",
    *,
    calibration=None,
    group_size: int | None = 128,
    symmetric: bool | None = None,
    lkd_steps: int = 100,
    act_order: bool = False,
    damp: float = 0.01,
    layers: LayerFilter | None = None,
) -> nnx.Module:
    """Quantizes the selected Linears in place and returns the model.

    ``method``: ``"rtn"`` (round to nearest), ``"lkd"`` (ZeroQuant layer-wise
    distillation) or ``"gptq"`` (second-order, layer-sequential; ``act_order``
    and ``damp`` as in :class:`GPTQConfig`); the last two need ``calibration``
    tokens ``[batch, seq]``. ``symmetric=None`` picks
    :func:`default_symmetric` (zero points for 4 bits). ``act_bits=8`` makes
    them W8A8 (symmetric 8-bit weights).

    ``group_size=None``: per-channel scales (one group spans the inputs), with
    which the W8A8 kernels accumulate the whole K in int32 and scale once per
    output tile; the default, groups of 128, is more accurate where a few
    input channels carry outliers and is what W8A8 uses unless asked.
    """
    check_choice("method", method, ("rtn", "lkd", "gptq"))
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    if act_bits == 8 and bits != 8:
        raise ValueError(f"act_bits=8 (W8A8) needs bits=8, got bits={bits}")
    check_choice("bits", bits, (4, 8))
    if group_size is not None:
        check_int("group_size", group_size, minimum=1)
    check_int("lkd_steps", lkd_steps, minimum=0)
    if symmetric is None:
        symmetric = default_symmetric(bits, act_bits)
    if act_bits is not None and not symmetric:
        raise ValueError("act_bits=8 (W8A8) needs symmetric weights, got symmetric=False")

    def group_for(w):
        k = w.shape[0]
        if group_size is None:  # per-channel
            return None
        return group_size if k % group_size == 0 or k > group_size else k

    if method == "gptq":
        _calibration_tokens(calibration, method)
        GPTQConfig(bits, group_size or 128, symmetric, act_order, damp=damp)  # validate early

        def compress(w, h):
            group = group_for(w) or -(-w.shape[0] // 128) * 128  # per-channel: one group
            config = GPTQConfig(bits, group, symmetric, act_order, damp=damp)
            return gptq(w, h, config)

        sequential_compress(model, calibration, compress, layers)
        for _, layer in _selected(model, layers):
            layer.act_bits = act_bits
        return model
    selected = _selected(model, layers)
    inputs = _calibration_inputs(model, method, method == "lkd", calibration)
    for path, layer in selected:
        w = _dense_weight(path, layer)
        group = group_for(w)
        if inputs is not None:
            check_finite(path, w)  # named by layer (lkd's quantize would say "w")
            quantized = lkd(
                w,
                inputs[id(layer)],
                bits=bits,
                group_size=group,
                symmetric=symmetric,
                steps=lkd_steps,
            )
        else:
            quantized = quantize(w, bits=bits, group_size=group, symmetric=symmetric, name=path)
        layer.kernel.set_value(quantized)
        layer.act_bits = act_bits
    return model


def model_nbytes(model: nnx.Module) -> int:
    """Bytes of all parameters as stored (sparse/quantized weights honestly)."""
    total = 0
    for leaf in nnx.state(model, nnx.Param).flat_state():
        value = leaf[1].get_value()
        total += value.nbytes if hasattr(value, "nbytes") else 0
    return total
