"""Whole-model conversion passes: sparsify and quantize every selected Linear."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallax._checks import check_choice, check_finite, check_float, check_int
from pallax.models import transformer
from pallax.models.transformer import Linear
from pallax.pallas_kernels import activation_norms, lkd, quantize, sparsify

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


def sparsify_model(
    model: nnx.Module,
    sparsity: float = 0.5,
    method: str = "magnitude",
    *,
    calibration=None,
    pattern: str | None = None,
    layers: LayerFilter | None = None,
) -> nnx.Module:
    """Prunes the selected Linears in place (``method="wanda"`` needs ``calibration``
    tokens ``[batch, seq]``) and returns the model."""
    if pattern is None:
        check_float("sparsity", sparsity, minimum=0.0, maximum=1.0, open_max=True)
    check_choice("method", method, ("magnitude", "wanda"))
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


def quantize_model(
    model: nnx.Module,
    bits: int = 8,
    act_bits: int | None = None,
    method: str = "rtn",
    *,
    calibration=None,
    group_size: int | None = 128,
    lkd_steps: int = 100,
    layers: LayerFilter | None = None,
) -> nnx.Module:
    """Quantizes the selected Linears in place: ``method="rtn"`` (round to
    nearest) or ``"lkd"`` (ZeroQuant layer-wise distillation on the
    ``calibration`` tokens' activations). ``act_bits=8`` makes them W8A8.

    ``group_size=None``: per-channel scales (one group spans the inputs), with
    which the W8A8 kernels accumulate the whole K in int32 and scale once per
    output tile; the default, groups of 128, is more accurate where a few
    input channels carry outliers and is what W8A8 uses unless asked."""
    if method not in ("rtn", "lkd"):
        raise ValueError(f"method must be 'rtn' or 'lkd', got {method!r}")
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    if act_bits == 8 and bits != 8:
        raise ValueError(f"act_bits=8 (W8A8) needs bits=8, got bits={bits}")
    check_choice("bits", bits, (4, 8))
    check_int("group_size", group_size, minimum=1)
    check_int("lkd_steps", lkd_steps, minimum=0)
    selected = _selected(model, layers)
    inputs = _calibration_inputs(model, method, method == "lkd", calibration)
    for path, layer in selected:
        w = _dense_weight(path, layer)
        k = w.shape[0]
        if group_size is None:
            group = None
        else:
            group = group_size if k % group_size == 0 or k > group_size else k
        if inputs is not None:
            check_finite(path, w)  # named by layer (lkd's quantize would say "w")
            quantized = lkd(w, inputs[id(layer)], bits=bits, group_size=group, steps=lkd_steps)
        else:
            quantized = quantize(w, bits=bits, group_size=group, name=path)
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
