"""compressed-tensors checkpoints (llm-compressor's format, served by vLLM) <-> our weights.

Two per-layer formats, converted straight between their packed forms (no
dense weight is built when reading):

* ``pack-quantized``: for a linear ``[out N, in K]`` (PyTorch layout),
  ``weight_packed int32 [N, ceil(K b / 32)]`` holds unsigned codes
  ``q + 2^(b-1)`` (``q`` the signed quantized value), element ``i`` of a row at
  bit ``i b`` of the little-endian row (4 bits: byte ``j`` holds ``k = 2j`` in
  its low nibble, ``2j + 1`` in its high one); ``weight_scale [N, ceil(K / g)]``;
  ``weight_zero_point`` (asymmetric only, signed, packed the same way along
  ``N``: ``int32 [ceil(N b / 32), ceil(K / g)]``); ``weight_shape int64 [2]``.
  A weight dequantizes as ``(q - zp) * scale``.
  Our :class:`QuantizedWeight` stores codes ``raw`` with ``(raw - zero) *
  scale``: the stored unsigned code is ``raw`` itself when asymmetric (then
  ``zp = zero - 2^(b-1)``) and ``raw - zero + 2^(b-1)`` when symmetric.
* ``sparse-bitmask``: ``weight.shape int64 [2]``, ``weight.bitmask uint8
  [N, ceil(K / 8)]`` (``numpy.packbits(mask, bitorder="little")`` per row),
  ``weight.compressed`` (the nonzeros in row-major order) and
  ``weight.row_offsets int64 [N]``. Reading re-orders the nonzeros into our
  64x64 tiles one 64-row band at a time.

The ``quantization_config`` in ``config.json`` groups layers by scheme
(``config_groups``: weights' ``num_bits``, ``symmetric``, ``strategy``
``group``/``channel``, ``group_size``; ``input_activations`` int8 per token for
W8A8) and names sparse layers in ``sparsity_config``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from pallax.pallas_kernels import QuantizedWeight, SparseWeight
from pallax.pallas_kernels.quantization import PACK_BLOCK
from pallax.pallas_kernels.sparse import (
    TILE_K,
    TILE_ROWS,
    SparseShards,
    _pack_bitmap,
    _quarter_offsets,
    _tile_major,
)

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
SPARSE_BITMASK = "sparse-bitmask"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------- packing


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``[rows, cols]`` -> ``int32 [rows, ceil(cols b / 32)]`` (dense LE packing)."""
    per_word = 32 // bits
    rows, cols = codes.shape
    padded = np.zeros((rows, _round_up(cols, per_word)), np.uint8)
    padded[:, :cols] = codes
    if bits == 4:
        padded = padded[:, 0::2] | (padded[:, 1::2] << 4)
    return np.ascontiguousarray(padded).view("<i4")


def _unpack_codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`_pack_codes`: ``uint8 [rows, cols]``."""
    data = np.ascontiguousarray(packed, "<i4").view(np.uint8)
    if bits == 4:
        data = np.stack([data & 15, data >> 4], axis=-1).reshape(data.shape[0], -1)
    return data[:, :cols]


# ----------------------------------------------------------------------------- quantized


def quantized_scheme(weight: QuantizedWeight, act_bits: int | None) -> dict:
    """The compressed-tensors ``QuantizationScheme`` fields of one of our weights."""
    strategy = "channel" if weight.padded_in_features == weight.group_size else "group"
    scheme = {
        "weights": {
            "num_bits": weight.bits,
            "type": "int",
            "symmetric": weight.symmetric,
            "strategy": strategy,
            "group_size": None if strategy == "channel" else weight.group_size,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        },
        "input_activations": None,
        "output_activations": None,
        "format": PACK_QUANTIZED,
    }
    if act_bits == 8:  # our W8A8: dynamic symmetric int8 per token
        scheme["input_activations"] = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
            "observer": None,
        }
    return scheme


def quantized_to_ct(weight: QuantizedWeight) -> dict[str, np.ndarray]:
    """``{weight_packed, weight_scale, weight_zero_point?, weight_shape}`` of one layer."""
    n, k = weight.out_features, weight.in_features
    groups = -(-k // weight.group_size)
    offset = 2 ** (weight.bits - 1)
    raw = np.asarray(weight.raw_values())[:n, :k]
    if weight.symmetric:
        codes = raw - int(weight.zero_points()) + offset
    else:
        codes = raw
    out = {
        "weight_packed": _pack_codes(codes.astype(np.uint8), weight.bits),
        "weight_scale": np.asarray(weight.scales, np.float32)[:n, :groups],
        "weight_shape": np.asarray([n, k], np.int64),
    }
    if not weight.symmetric:
        zp = np.asarray(weight.zeros)[:n, :groups].astype(np.int32)  # unsigned [0, 2^b)
        out["weight_zero_point"] = _pack_codes(zp.T.astype(np.uint8), weight.bits).T.copy()
    return out


def quantized_from_ct(
    tensors: dict[str, np.ndarray], weights: dict, name: str = "layer"
) -> QuantizedWeight:
    """One layer's pack-quantized tensors -> :class:`QuantizedWeight` (codes repacked, no
    dense weight). ``weights`` is the scheme's ``weights`` dict."""
    bits = weights.get("num_bits")
    if bits not in (4, 8) or weights.get("type", "int") != "int":
        raise ValueError(
            f"{name}: compressed-tensors weights of {bits}-bit {weights.get('type')!r} are not "
            "supported (int4 and int8 are)"
        )
    n, k = (int(d) for d in np.asarray(tensors["weight_shape"]).reshape(-1))
    strategy = weights.get("strategy", "group")
    if strategy == "group":
        group = int(weights["group_size"])
    elif strategy == "channel":
        group = _round_up(k, PACK_BLOCK)
    else:
        raise ValueError(f"{name}: quantization strategy {strategy!r} is not supported")
    if group % PACK_BLOCK and PACK_BLOCK % group:
        raise ValueError(f"{name}: group_size {group} must divide or be a multiple of {PACK_BLOCK}")
    scales = np.asarray(tensors["weight_scale"], np.float32).reshape(n, -1)
    groups = -(-k // group)
    if scales.shape != (n, groups):
        raise ValueError(f"{name}: weight_scale shape {scales.shape} != {(n, groups)}")
    kp = _round_up(k, max(group, PACK_BLOCK))
    np_ = _round_up(n, PACK_BLOCK)
    offset = 2 ** (bits - 1)
    codes = _unpack_codes(tensors["weight_packed"], bits, k).astype(np.int32)
    if codes.shape != (n, k):
        raise ValueError(f"{name}: weight_packed unpacks to {codes.shape}, expected {(n, k)}")
    symmetric = bool(weights.get("symmetric", True))
    # Padding as quantize() leaves it (smallest normal scale, code of 0), so a
    # to_hf -> from_hf round trip is bit-exact.
    full_scales = np.full((np_, kp // group), np.finfo(np.float32).tiny, np.float32)
    full_scales[:n, :groups] = scales
    if symmetric:
        # Our symmetric zero: 8 for int4 (raw = q + 8 = code), 0 for int8 (raw = q).
        zero = 8 if bits == 4 else 0
        raw = np.full((np_, kp), zero, np.int32)
        raw[:n, :k] = codes - offset + zero
        zeros = None
    else:
        if "weight_zero_point" not in tensors:
            raise ValueError(f"{name}: asymmetric scheme but no weight_zero_point")
        zp = _unpack_codes(np.asarray(tensors["weight_zero_point"]).T, bits, n).T
        zeros = np.zeros((np_, kp // group), np.float32)
        zeros[:n, :groups] = zp.reshape(n, groups)
        raw = np.zeros((np_, kp), np.int32)
        raw[:n, :k] = codes
    if bits == 8:
        values = raw.astype(np.int8 if symmetric else np.uint8)
    else:
        blocks = raw.reshape(np_, kp // PACK_BLOCK, 2, PACK_BLOCK // 2)
        values = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(np_, kp // 2).astype(np.uint8)
    return QuantizedWeight(
        values=jnp.asarray(values),
        scales=jnp.asarray(full_scales),
        zeros=None if zeros is None else jnp.asarray(zeros),
        in_features=k,
        out_features=n,
        bits=bits,
        group_size=group,
    )


# ----------------------------------------------------------------------------- sparse


def sparse_to_ct(weight: SparseWeight | SparseShards) -> dict[str, np.ndarray]:
    """``{shape, compressed, bitmask, row_offsets}`` (the ``weight.`` suffixes) of one layer."""
    if isinstance(weight, SparseShards):
        weight = weight.merge()
    mask_t = np.asarray(weight.mask()).T  # [N, K]
    values = np.asarray(weight.todense(), np.float32).T[mask_t]  # row-major order
    counts = mask_t.sum(axis=1).astype(np.int64)
    return {
        "shape": np.asarray(mask_t.shape, np.int64),
        "compressed": values,
        "bitmask": np.packbits(mask_t, axis=-1, bitorder="little"),
        "row_offsets": np.cumsum(counts) - counts,
    }


def sparse_from_ct(tensors: dict[str, np.ndarray], name: str = "layer") -> SparseWeight:
    """One layer's sparse-bitmask tensors -> :class:`SparseWeight`, 64 rows at a time."""
    n, k = (int(d) for d in np.asarray(tensors["shape"]).reshape(-1))
    bitmask = np.asarray(tensors["bitmask"], np.uint8)
    if bitmask.shape != (n, -(-k // 8)):
        raise ValueError(f"{name}: bitmask shape {bitmask.shape} != {(n, -(-k // 8))}")
    compressed = np.asarray(tensors["compressed"]).reshape(-1)
    row_offsets = np.asarray(tensors["row_offsets"]).reshape(-1).astype(np.int64)
    kp, np_ = _round_up(max(k, 1), TILE_K), _round_up(max(n, 1), TILE_ROWS)
    values, bitmaps, offsets, done = [], [], [], 0
    for start in range(0, np_, TILE_ROWS):
        band = np.zeros((TILE_ROWS, kp), bool)
        rows = slice(start, min(start + TILE_ROWS, n))
        if start < n:
            band[: rows.stop - start, :k] = np.unpackbits(
                bitmask[rows], axis=-1, count=k, bitorder="little"
            ).astype(bool)
        # Row-major rank of each nonzero inside the band -> its tile-major order.
        rank = (np.cumsum(band.reshape(-1)) - 1).reshape(band.shape)
        tiles_mask = _tile_major(band)
        first = row_offsets[start] if start < n else done
        if start < n and first != done:
            raise ValueError(f"{name}: row_offsets[{start}] = {first}, expected {done}")
        values.append(compressed[first + _tile_major(rank)[tiles_mask]])
        bitmaps.append(_pack_bitmap(band))
        offsets.append(_quarter_offsets(tiles_mask) + done)
        done += int(tiles_mask.sum())
    if done != compressed.size:
        raise ValueError(f"{name}: bitmask has {done} set bits but {compressed.size} values")
    return SparseWeight(
        values=jnp.asarray(np.concatenate(values).astype(np.float32)),
        bitmap=jnp.asarray(np.concatenate(bitmaps)),
        tile_offsets=jnp.asarray(np.concatenate(offsets).astype(np.int32)),
        in_features=k,
        out_features=n,
    )


# ----------------------------------------------------------------------------- configs


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return name == target or target == "Linear" or name.endswith("." + target)


def scheme_for(quantization_config: dict, module: str) -> dict | None:
    """The config group whose targets match ``module`` (HF module name), or None."""
    if any(_matches(module, t) for t in quantization_config.get("ignore") or []):
        return None
    for group in (quantization_config.get("config_groups") or {}).values():
        if any(_matches(module, t) for t in group.get("targets", [])):
            return group
    return None


def read_linear(
    module: str, quantization_config: dict, has_tensor: Callable[[str], bool], read
) -> QuantizedWeight | SparseWeight | None:
    """Our weight for HF module ``module`` if it is stored compressed, else None.

    ``has_tensor(name)`` says whether the checkpoint holds ``name``; ``read(names)``
    returns ``{name: numpy array}``.
    """
    if has_tensor(f"{module}.weight_packed"):
        group = scheme_for(quantization_config, module)
        if group is None:
            raise ValueError(f"{module}.weight_packed has no matching config_groups entry")
        layer_format = group.get("format") or quantization_config.get("format")
        if layer_format not in (PACK_QUANTIZED, "mixed-precision", None):
            raise ValueError(
                f"{module}: compressed-tensors format {layer_format!r} is not supported "
                f"(supported: {PACK_QUANTIZED}, {SPARSE_BITMASK})"
            )
        names = ["weight_packed", "weight_scale", "weight_shape"]
        if not group["weights"].get("symmetric", True):
            names.append("weight_zero_point")
        tensors = read([f"{module}.{n}" for n in names])
        tensors = {n: tensors[f"{module}.{n}"] for n in names}
        return quantized_from_ct(tensors, group["weights"], module)
    if has_tensor(f"{module}.weight.bitmask"):
        names = ["shape", "compressed", "bitmask", "row_offsets"]
        tensors = read([f"{module}.weight.{n}" for n in names])
        return sparse_from_ct({n: tensors[f"{module}.weight.{n}"] for n in names}, module)
    return None


def act_bits_for(quantization_config: dict, module: str) -> int | None:
    group = scheme_for(quantization_config, module) or {}
    acts = group.get("input_activations")
    if not acts:
        return None
    if acts.get("num_bits") != 8 or acts.get("type", "int") != "int":
        raise ValueError(
            f"{module}: input activations {acts.get('num_bits')}-bit {acts.get('type')!r} are "
            "not supported (int8 per token is)"
        )
    return 8


def quantization_config(layers: dict[str, tuple[object, int | None]]) -> dict | None:
    """``quantization_config`` for ``{hf module name: (weight, act_bits)}`` of compressed layers."""
    groups: dict[str, dict] = {}
    sparse: list[str] = []
    nnz = total = 0
    for module, (weight, act_bits) in layers.items():
        if isinstance(weight, SparseWeight | SparseShards):
            sparse.append(module)
            nnz += int(weight.values.shape[0])
            total += weight.in_features * weight.out_features
            continue
        scheme = quantized_scheme(weight, act_bits)
        key = repr(scheme)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(module)
    if not groups and not sparse:
        return None
    config = {
        "quant_method": QUANT_METHOD,
        "format": PACK_QUANTIZED if groups else "dense",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": [],
        "kv_cache_scheme": None,
    }
    if sparse:
        config["sparsity_config"] = {
            "format": SPARSE_BITMASK,
            "targets": sparse,
            "ignore": [],
            "global_sparsity": 1.0 - nnz / total if total else 0.0,
            "sparsity_structure": "unstructured",
        }
    return config
