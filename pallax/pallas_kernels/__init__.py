"""Pallas (Mosaic GPU) kernels with XLA fallbacks."""

from pallax.pallas_kernels.attention import dot_product_attention
from pallax.pallas_kernels.attention_mgpu import AttentionConfig

__all__ = ["AttentionConfig", "dot_product_attention"]
