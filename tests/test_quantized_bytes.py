"""Bytes the quantized matmul kernels move at decode-sized M, counted from the CUDA-lowered module.

A memory-bound kernel cannot beat its bytes: the operands and results of its
Mosaic custom calls (as lowered for an H100 on CPU) must stay within 1.15x
the format's ideal, ``stored weight (values, scales, zero points) + x + y``
in bf16. The legacy kernel (M padded to 64, fp32 split-K partials as large as
the weight) moved 2.06x at W4A16 4096 x 4096, M = 1.

Split-K (issue 13): with ``split_k_reduction="tma_add"`` (the default) the
kernel reduce-adds into one fp32 ``[Np, Mp]`` accumulator that is an operand
and the (aliased) result of the custom call, so it is counted twice (read +
write); "partials" writes ``[splits, Np, Mp]`` (counted once, as a result).
:func:`xla_bytes_around_calls` adds what XLA moves for them: the accumulator's
zeros and one read of every result (the partials' sum, the transpose).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import pytest

from pallax import testing
from pallax.pallas_kernels import QuantMatmulConfig, quantize, quantized_matmul

MAX_RATIO = 1.15
_TENSOR = re.compile(r"tensor<([0-9x]*)x?([a-z]+[0-9]+)>")
_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "ui32": 4, "i8": 1, "ui8": 1, "i16": 2}
_OPERANDS = re.compile(r"custom_call @mosaic_gpu\w*\(([^)]*)\)")


def _tensor_bytes(types: str) -> list[int]:
    """Bytes of each ``tensor<...>`` type in ``types``, in order."""
    sizes = []
    for dims, dtype in _TENSOR.findall(types):
        shape = [int(d) for d in dims.split("x") if d] if dims else []
        sizes.append(math.prod(shape) * _ITEMSIZE[dtype])
    return sizes


def _mosaic_calls(module_text: str) -> list[str]:
    calls = [line for line in module_text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert calls, "no Mosaic GPU custom call in the module"
    return calls


def _signature(call: str) -> tuple[str, str]:
    """``(operand types, result types)`` of a custom call line."""
    operands, results = call[call.rindex(" : (") :].split("->")
    return operands, results


def mosaic_call_bytes(module_text: str) -> int:
    """Sum of operand and result bytes of every Mosaic GPU custom call in ``module_text``."""
    return sum(sum(_tensor_bytes("".join(_signature(call)))) for call in _mosaic_calls(module_text))


def xla_bytes_around_calls(module_text: str) -> int:
    """Bytes XLA moves for the Mosaic calls' outputs: each operand it fills with a
    constant (the zero-initialised split-K accumulator) is written once, each
    result (partials, accumulator, output) is read once."""
    defined_by = {}
    for line in module_text.splitlines():
        name, eq, rest = line.strip().partition(" = ")
        if eq:
            defined_by[name] = rest
    total = 0
    for call in _mosaic_calls(module_text):
        operand_types, result_types = _signature(call)
        names = [n.strip() for n in _OPERANDS.search(call).group(1).split(",")]
        for name, size in zip(names, _tensor_bytes(operand_types), strict=True):
            if defined_by.get(name, "").startswith("stablehlo.broadcast_in_dim %cst"):
                total += size
        total += sum(_tensor_bytes(result_types))
    return total


FORMATS = {
    "w4a16": dict(bits=4, act_bits=None, symmetric=True, group_size=128),
    "w4a16-asym": dict(bits=4, act_bits=None, symmetric=False, group_size=128),
    "w8a16": dict(bits=8, act_bits=None, symmetric=True, group_size=128),
    "w8a8": dict(bits=8, act_bits=8, symmetric=True, group_size=128),
    "w8a8-per-channel": dict(bits=8, act_bits=8, symmetric=True, group_size=None),
}


def lowered_text(fmt: str, m: int, k: int, n: int, config=None) -> tuple[str, int]:
    """The CUDA-lowered module of ``quantized_matmul`` and the format's ideal bytes."""
    spec = FORMATS[fmt]
    qw = jax.eval_shape(
        functools.partial(
            quantize, bits=spec["bits"], group_size=spec["group_size"], symmetric=spec["symmetric"]
        ),
        jax.ShapeDtypeStruct((k, n), jnp.float32),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    run = functools.partial(
        quantized_matmul, act_bits=spec["act_bits"], implementation="mosaic", config=config
    )
    text = testing.lower_for_cuda(run, x, qw).mlir_module()
    weight = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(qw))
    return text, weight + 2 * m * k + 2 * m * n


def bytes_ratio(fmt: str, m: int, k: int, n: int, config=None) -> float:
    text, ideal = lowered_text(fmt, m, k, n, config)
    return mosaic_call_bytes(text) / ideal


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("reduction", ["tma_add", "partials"])
def test_decode_shapes_move_at_most_1_15x_their_ideal_bytes(reduction, fmt, m, k, n):
    ratio = bytes_ratio(fmt, m, k, n, QuantMatmulConfig(split_k_reduction=reduction))
    assert ratio <= MAX_RATIO, f"{fmt} M={m} {k}x{n} {reduction} moves {ratio:.2f}x its ideal"


def test_the_count_sees_the_legacy_kernels_padding_and_partials():
    """The counter is not blind: the legacy kernel with its fp32 partials fails the bound."""
    config = QuantMatmulConfig(variant="legacy", split_k_reduction="partials")
    assert bytes_ratio("w4a16", 1, 4096, 4096, config) > 1.9


@pytest.mark.parametrize("fmt", ["w4a16", "w8a8-per-channel"])
@pytest.mark.parametrize("m", [1, 16])
def test_tma_add_moves_fewer_bytes_than_partials(fmt, m):
    """At a decode shape with S = 4 (W4A16: scale slabs of 8 blocks) or 5 splits:
    the accumulator ``A = [Np, Mp]`` fp32 is counted as read and written by the
    kernel (2 A, aliased operand and result) against S A of partials; with XLA
    around (zeros, reads), 4 A against 2 S A."""
    k = n = 4096
    texts = {
        reduction: lowered_text(fmt, m, k, n, QuantMatmulConfig(split_k_reduction=reduction))[0]
        for reduction in ("tma_add", "partials")
    }
    (partials_call,) = _mosaic_calls(texts["partials"])
    (tma_call,) = _mosaic_calls(texts["tma_add"])
    splits = int(re.search(r"-> tensor<(\d+)x4096x(\d+)xf32>", partials_call).group(1))
    accumulator = f"tensor<4096x{8 if m == 1 else 16}xf32>"
    assert splits == (4 if fmt == "w4a16" else 5)
    operands, results = _signature(tma_call)
    assert accumulator in operands and results.strip().startswith(accumulator)
    assert "output_operand_aliases" in tma_call
    acc_bytes = 4096 * (8 if m == 1 else 16) * 4
    kernel = {r: mosaic_call_bytes(t) for r, t in texts.items()}
    assert kernel["partials"] - kernel["tma_add"] == (splits - 2) * acc_bytes
    total = {r: kernel[r] + xla_bytes_around_calls(t) for r, t in texts.items()}
    assert total["partials"] - total["tma_add"] == (2 * splits - 4) * acc_bytes


@pytest.mark.parametrize("symmetric", [True, False])
def test_decode_reads_scales_as_stored_without_an_xla_transpose(symmetric):
    """Scales and zero points reach the swap kernel in their stored [N, K / 128]
    layout (one slab per CTA), so no XLA op rewrites them on every call."""
    qw = jax.eval_shape(
        functools.partial(quantize, bits=4, group_size=128, symmetric=symmetric),
        jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
    )
    x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
    run = functools.partial(quantized_matmul, implementation="mosaic")
    text = testing.lower_for_cuda(run, x, qw).mlir_module()
    (call,) = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    operands = call[call.rindex(" : (") : call.rindex("->")]
    assert operands.count("tensor<4096x32xf32>") == (1 if symmetric else 2)
    assert "stablehlo.transpose" not in text.split("custom_call @mosaic_gpu")[0]


def sparse_lowered_text(sparsity, m, k, n, reduction) -> tuple[str, int]:
    from benchmarks.weights import random_sparse_weight
    from pallax.pallas_kernels import sparse_matmul
    from pallax.pallas_kernels.sparse_matmul_mgpu import SpmmConfig

    w = jax.eval_shape(
        functools.partial(random_sparse_weight, in_features=k, out_features=n, sparsity=sparsity),
        jax.random.key(0),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    config = SpmmConfig(split_k_reduction=reduction)
    run = functools.partial(sparse_matmul, implementation="mosaic", config=config)
    text = testing.lower_for_cuda(run, x, w).mlir_module()
    weight = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(w))
    return text, weight + 2 * m * k + 2 * m * n


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("reduction", ["tma_add", "partials"])
def test_sparse_decode_moves_at_most_1_15x_its_ideal_bytes(reduction, sparsity, m, k, n):
    """The same bound for the sparse kernel: the format's bytes (bf16 nonzeros,
    bitmap, quarter-tile offsets) + x + y; split-K partials (or the reduced
    accumulator) and token padding are what could push it over."""
    text, ideal = sparse_lowered_text(sparsity, m, k, n, reduction)
    ratio = mosaic_call_bytes(text) / ideal
    assert ratio <= MAX_RATIO, f"{sparsity:.0%} M={m} {k}x{n} moves {ratio:.2f}x its ideal bytes"


def test_sparse_tma_add_splits_past_the_partials_cap_in_the_same_bytes():
    """90% sparse, 4096 x 4096, 16 tokens: the partials path is capped at 2
    splits (128 CTAs: fewer than an H100's 132 SMs) by their bytes; tma_add
    takes 4 (256 CTAs, two waves 97% full; 5 would leave a third wave 42%
    full) for the same 2 accumulator's worth in the kernel."""
    from benchmarks.weights import random_sparse_weight
    from pallax.pallas_kernels import sparse_matmul_mgpu as sm

    texts = {r: sparse_lowered_text(0.9, 16, 4096, 4096, r)[0] for r in ("tma_add", "partials")}
    (partials_call,) = _mosaic_calls(texts["partials"])
    assert "-> tensor<2x4096x16xf32>" in partials_call
    assert mosaic_call_bytes(texts["tma_add"]) == mosaic_call_bytes(texts["partials"])
    w = jax.eval_shape(
        functools.partial(random_sparse_weight, in_features=4096, out_features=4096, sparsity=0.9),
        jax.random.key(0),
    )
    config = sm.SpmmConfig()
    assert sm.k_splits(config, w, 16, "partials") == (2, 32)
    assert sm.k_splits(config, w, 16, "tma_add") == (4, 16)  # >= 4 tiles per split
