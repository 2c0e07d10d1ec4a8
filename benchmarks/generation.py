"""Decode throughput: dense bf16 vs W8 / W4 / sparse variants of one model, one run.

    python -m benchmarks.generation              # GPU: ~1B-parameter config
    python -m benchmarks.generation --quick      # tiny config, any backend
    python -m benchmarks.generation --model gemma [--variants dense,w4]  # Gemma-2-like

Reports decode tokens/s and achieved bandwidth = (weight bytes + KV-cache bytes
read per step) / step time. Step time = (time for N new tokens - time for 1) /
(N - 1), so the prefill cancels out (a wall-clock, end-to-end figure over the
whole jitted decode loop). The model is cast to bf16 first and only then
pruned or quantized, so sparse weights store bf16 values (pruning the fp32
master would keep fp32 nonzeros and read more bytes than dense bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallax.models import Transformer, TransformerConfig, generate, quantize_model, sparsify_model
from pallax.models.convert import linears

ONE_B = TransformerConfig(
    vocab_size=32000,
    embed_dim=2048,
    num_layers=16,
    num_heads=16,
    num_kv_heads=4,
    mlp_dim=5632,
    sliding_window=4096,
)
TINY = TransformerConfig(
    vocab_size=256,
    embed_dim=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=256,
    sliding_window=64,
)

# Gemma-2-like ~1B: local (4096) / global layers alternating, head_dim 256, query scale
# 1/sqrt(256), attention soft cap 50 (in the decode kernel) and final-logit cap 30,
# sandwich norms, GeGLU. Vocabulary as ONE_B so the head costs the same.
GEMMA_OPTIONS = dict(
    norm_weight_offset=1.0,
    sandwich_norms=True,
    mlp_activation="gelu_tanh",
    scale_embeddings=True,
    query_pre_attn_scalar=256.0,
    attention_logits_soft_cap=50.0,
    final_logits_soft_cap=30.0,
    tie_embeddings=True,
)
GEMMA_LIKE = TransformerConfig(
    vocab_size=32000,
    embed_dim=2048,
    num_layers=16,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    mlp_dim=8192,
    layer_windows=(4096, None) * 8,
    **GEMMA_OPTIONS,
)
GEMMA_TINY = TransformerConfig(
    vocab_size=256,
    embed_dim=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=256,
    layer_windows=(16, None),
    **GEMMA_OPTIONS,
)

VARIANTS = {
    "dense": lambda m: m,
    "w8": lambda m: quantize_model(m, bits=8),
    "w4": lambda m: quantize_model(m, bits=4),
    "sparse50": lambda m: sparsify_model(m, 0.5),
    "sparse70": lambda m: sparsify_model(m, 0.7),
}


def weight_bytes(model) -> int:
    """Bytes of block weights read per decode step (bf16 for dense) + embeddings/head."""
    total = 0
    for _, layer in linears(model):
        w = layer.kernel.get_value()
        total += w.nbytes if not isinstance(w, jax.Array) else w.size * 2
    return total + model.config.vocab_size * model.config.embed_dim * 2


def to_bf16(model):
    """Inference copy: dense parameters in bf16 (what a decode step reads)."""
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        if isinstance(value, jax.Array) and value.dtype == jnp.float32:
            variable.set_value(value.astype(jnp.bfloat16))
    return model


def build_variant(name: str, config):
    """The inference model of ``name``: bf16 first, then the conversion."""
    return VARIANTS[name](to_bf16(Transformer(config, rngs=nnx.Rngs(0))))


def _timed_generate(model, prompt, new_tokens, repeats=3):
    """Median wall time of ``generate`` (compiled first)."""
    jax.block_until_ready(generate(model, prompt, new_tokens))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(generate(model, prompt, new_tokens))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(config, batches, prompt_len, new_tokens, variants=tuple(VARIANTS)):
    print(
        f"# device={jax.devices()[0].device_kind} jax={jax.__version__} "
        f"layers={config.num_layers} embed={config.embed_dim} prompt={prompt_len} "
        f"new={new_tokens}"
    )
    print(
        f"{'variant':<10}{'batch':>6}{'weights MB':>12}{'tok/s':>10}{'ms/step':>9}{'GB/s':>8}"
        f"{'vs dense':>9}"
    )
    rows = []
    dense_rate = {}
    for name in variants:
        model = build_variant(name, config)
        w_bytes = weight_bytes(model)
        for batch in batches:
            prompt = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len))
            full = _timed_generate(model, prompt, new_tokens)
            step = max(full - _timed_generate(model, prompt, 1), 1e-9) / (new_tokens - 1)
            kv = sum(
                2
                * batch
                * min(prompt_len + new_tokens, config.window(i) or 1 << 30)
                * config.num_kv_heads
                * config.dim_per_head
                * 2
                for i in range(config.num_layers)
            )
            rate = batch / step
            if name == "dense":
                dense_rate[batch] = rate
            print(
                f"{name:<10}{batch:>6}{w_bytes / 2**20:>12.1f}{rate:>10.1f}{step * 1e3:>9.2f}"
                f"{(w_bytes + kv) / step / 1e9:>8.1f}{rate / dense_rate[batch]:>8.2f}x",
                flush=True,
            )
            rows.append((name, batch, rate))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--model", choices=("llama", "gemma"), default="llama")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help="names, space or comma separated"
    )
    args = parser.parse_args(argv)
    variants = tuple(v for arg in args.variants for v in arg.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "dense" not in variants:
        parser.error(f"--variants must include dense and name only {tuple(VARIANTS)}")
    gemma = args.model == "gemma"
    if args.quick:
        return run(GEMMA_TINY if gemma else TINY, [2], 16, 48, variants)
    return run(GEMMA_LIKE if gemma else ONE_B, [1, 16], 128, args.new, variants)


if __name__ == "__main__":
    main()
