"""``linear(x, w)``: the one place that maps a weight type to its matmul kernel.

Models and the sharding wrappers call this, so a layer's path down to its
kernel is the same whether the weight is dense, sparse or quantized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax._checks import check_array
from pallax.pallas_kernels.quantization import QuantizedWeight, quantized_matmul
from pallax.pallas_kernels.sparse import SparseWeight, sparse_matmul


def linear(x: jax.Array, w, *, act_bits: int | None = None, implementation=None) -> jax.Array:
    """``x [..., in] @ w [in, out]`` for a dense array, SparseWeight or QuantizedWeight.

    Dense weights are cast to ``x.dtype`` (bf16 compute, fp32 master weights)
    and accumulate in fp32. ``act_bits=8`` selects W8A8 for quantized weights.
    """
    check_array("x", x)
    if isinstance(w, QuantizedWeight):
        return quantized_matmul(x, w, act_bits=act_bits, implementation=implementation)
    if isinstance(w, SparseWeight):
        return sparse_matmul(x, w, implementation=implementation)
    if act_bits is not None:
        raise ValueError(f"act_bits={act_bits} needs a QuantizedWeight, got a dense weight")
    check_array("w", w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x {x.shape} does not match weight {w.shape} ([in, out])")
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
