"""Bytes the quantized matmul kernels move at decode-sized M, counted from the CUDA-lowered module.

A memory-bound kernel cannot beat its bytes: the operands and results of its
Mosaic custom calls (as lowered for an H100 on CPU) must stay within 1.15x
the format's ideal, ``stored weight (values, scales, zero points) + x + y``
in bf16. The legacy kernel (M padded to 64, fp32 split-K partials as large as
the weight) moved 2.06x at W4A16 4096 x 4096, M = 1.
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


def mosaic_call_bytes(module_text: str) -> int:
    """Sum of operand and result bytes of every Mosaic GPU custom call in ``module_text``."""
    total = 0
    calls = [line for line in module_text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert calls, "no Mosaic GPU custom call in the module"
    for line in calls:
        signature = line[line.rindex(" : (") :]  # (operand types) -> result types
        for dims, dtype in _TENSOR.findall(signature):
            shape = [int(d) for d in dims.split("x") if d] if dims else []
            total += math.prod(shape) * _ITEMSIZE[dtype]
    return total


FORMATS = {
    "w4a16": dict(bits=4, act_bits=None, symmetric=True, group_size=128),
    "w4a16-asym": dict(bits=4, act_bits=None, symmetric=False, group_size=128),
    "w8a16": dict(bits=8, act_bits=None, symmetric=True, group_size=128),
    "w8a8": dict(bits=8, act_bits=8, symmetric=True, group_size=128),
    "w8a8-per-channel": dict(bits=8, act_bits=8, symmetric=True, group_size=None),
}


def bytes_ratio(fmt: str, m: int, k: int, n: int, config=None) -> float:
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
    moved = mosaic_call_bytes(testing.lower_for_cuda(run, x, qw).mlir_module())
    weight = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(qw))
    ideal = weight + 2 * m * k + 2 * m * n
    return moved / ideal


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decode_shapes_move_at_most_1_15x_their_ideal_bytes(fmt, m, k, n):
    ratio = bytes_ratio(fmt, m, k, n)
    assert ratio <= MAX_RATIO, f"{fmt} M={m} {k}x{n} moves {ratio:.2f}x its ideal bytes"


def test_the_count_sees_the_legacy_kernels_padding_and_partials():
    """The counter is not blind: the legacy kernel, still selectable, fails the bound."""
    ratio = bytes_ratio("w4a16", 1, 4096, 4096, QuantMatmulConfig(variant="legacy"))
    assert ratio > 1.9


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


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparse_decode_moves_at_most_1_15x_its_ideal_bytes(sparsity, m, k, n):
    """The same bound for the sparse kernel: the format's bytes (bf16 nonzeros,
    bitmap, quarter-tile offsets) + x + y; split-K partials and token padding
    are what could push it over."""
    from benchmarks.weights import random_sparse_weight
    from pallax.pallas_kernels import sparse_matmul

    w = jax.eval_shape(
        functools.partial(random_sparse_weight, in_features=k, out_features=n, sparsity=sparsity),
        jax.random.key(0),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    run = functools.partial(sparse_matmul, implementation="mosaic")
    moved = mosaic_call_bytes(testing.lower_for_cuda(run, x, w).mlir_module())
    weight = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(w))
    ratio = moved / (weight + 2 * m * k + 2 * m * n)
    assert ratio <= MAX_RATIO, f"{sparsity:.0%} M={m} {k}x{n} moves {ratio:.2f}x its ideal bytes"
