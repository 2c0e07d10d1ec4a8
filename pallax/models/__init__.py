"""Flax NNX decoder transformers (Llama, Mistral, Qwen2.5, Qwen3, Gemma 2/3) on pallax kernels."""

from pallax.models.convert import (
    collect_linear_inputs,
    linears,
    model_nbytes,
    quantize_model,
    sparsify_model,
)
from pallax.models.generate import generate
from pallax.models.hf import from_hf, to_hf
from pallax.models.transformer import (
    Linear,
    RopeScaling,
    Transformer,
    TransformerConfig,
    logical_shardings,
    shard_model,
)

__all__ = [
    "Linear",
    "RopeScaling",
    "Transformer",
    "TransformerConfig",
    "collect_linear_inputs",
    "from_hf",
    "generate",
    "linears",
    "logical_shardings",
    "model_nbytes",
    "quantize_model",
    "shard_model",
    "sparsify_model",
    "to_hf",
]
