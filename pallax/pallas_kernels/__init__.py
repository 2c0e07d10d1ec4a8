"""Pallas (Mosaic GPU) kernels with XLA fallbacks."""

from pallax.pallas_kernels.attention import dot_product_attention
from pallax.pallas_kernels.attention_mgpu import AttentionConfig
from pallax.pallas_kernels.decode_attention import decode_attention
from pallax.pallas_kernels.decode_attention_mgpu import DecodeConfig
from pallax.pallas_kernels.linear import linear
from pallax.pallas_kernels.quantization import (
    QuantizedWeight,
    fake_quantize,
    lkd,
    quantize,
    quantize_activations,
    quantized_matmul,
)
from pallax.pallas_kernels.quantized_matmul_mgpu import QuantMatmulConfig
from pallax.pallas_kernels.sparse import (
    SparseShards,
    SparseWeight,
    activation_norms,
    sparse_matmul,
    sparsify,
    split_sparse,
)

__all__ = [
    "AttentionConfig",
    "DecodeConfig",
    "QuantMatmulConfig",
    "QuantizedWeight",
    "SparseShards",
    "SparseWeight",
    "activation_norms",
    "decode_attention",
    "dot_product_attention",
    "fake_quantize",
    "linear",
    "lkd",
    "quantize",
    "quantize_activations",
    "quantized_matmul",
    "sparse_matmul",
    "sparsify",
    "split_sparse",
]
