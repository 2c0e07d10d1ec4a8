"""Pallas (Mosaic GPU) kernels with XLA fallbacks."""

from pallax.pallas_kernels.attention import dot_product_attention
from pallax.pallas_kernels.attention_mgpu import AttentionConfig
from pallax.pallas_kernels.decode_attention import decode_attention
from pallax.pallas_kernels.decode_attention_mgpu import DecodeConfig

__all__ = ["AttentionConfig", "DecodeConfig", "decode_attention", "dot_product_attention"]
