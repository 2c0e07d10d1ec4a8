"""Transformer: cached generation vs recomputation, conversions, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallax import sharding as ps
from pallax.models import (
    Transformer,
    TransformerConfig,
    generate,
    linears,
    model_nbytes,
    quantize_model,
    shard_model,
    sparsify_model,
)
from pallax.pallas_kernels import QuantizedWeight, SparseWeight

CONFIG = TransformerConfig(
    vocab_size=64,
    embed_dim=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    layer_windows=(5, None, 7),
    dtype="float32",
)


def model(config=CONFIG, seed=0):
    return Transformer(config, rngs=nnx.Rngs(seed))


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 64, shape).astype(np.int32)


def greedy_by_recomputation(m, prompt, steps):
    seq = jnp.asarray(prompt)
    out = []
    for _ in range(steps):
        token = jnp.argmax(m(seq)[:, -1], axis=-1).astype(jnp.int32)
        out.append(token)
        seq = jnp.concatenate([seq, token[:, None]], axis=1)
    return np.stack(out, axis=1)


def test_cached_greedy_generation_equals_recomputation_past_the_window():
    m = model()
    prompt = tokens((2, 6))
    got = generate(m, prompt, 12)  # 18 tokens: past both windows (5 and 7)
    np.testing.assert_array_equal(np.asarray(got), greedy_by_recomputation(m, prompt, 12))


# Every family option at once (Gemma 2/3 + Qwen2.5 bias + Qwen3-style q/k norms): local
# layers of 5 and 7 around a global one, soft caps small enough to bite at this init.
FAMILY_CONFIG = dataclasses.replace(
    CONFIG,
    qkv_bias=True,
    qk_norm=True,
    norm_weight_offset=1.0,
    sandwich_norms=True,
    mlp_activation="gelu_tanh",
    scale_embeddings=True,
    query_pre_attn_scalar=24.0,
    attention_logits_soft_cap=0.5,
    final_logits_soft_cap=3.0,
    rope_theta=1e6,
    local_rope_theta=1e4,
)


def family_model(seed=0):
    """FAMILY_CONFIG with every parameter (norm scales and biases too) moved off its init."""
    m = model(FAMILY_CONFIG, seed)
    state = nnx.state(m, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 10), len(jax.tree.leaves(state))))
    nnx.update(m, jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), state))
    return m


def test_family_options_generation_equals_recomputation_past_the_window():
    m = family_model()
    prompt = tokens((2, 6))
    got = np.asarray(generate(m, prompt, 12))  # 18 tokens: past both windows (5 and 7)
    np.testing.assert_array_equal(got, greedy_by_recomputation(m, prompt, 12))
    assert len(set(got.ravel().tolist())) > 4  # not a degenerate repetition
    # The attention soft cap is live in both paths: without it the logits move.
    uncapped = nnx.clone(m)
    uncapped.config = dataclasses.replace(FAMILY_CONFIG, attention_logits_soft_cap=None)
    for block in uncapped.blocks:
        block.attention.config = uncapped.config
    x = jnp.asarray(tokens((2, 12)))
    assert np.abs(np.asarray(uncapped(x)) - np.asarray(m(x))).max() > 0.05


def test_batched_prompts_of_different_lengths_match_single_runs():
    m = model(seed=1)
    prompts = [tokens((9,), seed=2).tolist(), tokens((3,), seed=3).tolist()]
    batched = np.asarray(generate(m, prompts, 8))
    for i, p in enumerate(prompts):
        single = greedy_by_recomputation(m, np.asarray([p]), 8)
        np.testing.assert_array_equal(batched[i], single[0])


def test_sampling_controls():
    m = model()
    prompt = tokens((2, 4))
    greedy = np.asarray(generate(m, prompt, 6))
    np.testing.assert_array_equal(
        np.asarray(generate(m, prompt, 6, temperature=1.0, top_k=1)), greedy
    )
    a = np.asarray(generate(m, prompt, 16, temperature=2.0, seed=1))
    b = np.asarray(generate(m, prompt, 16, temperature=2.0, seed=2))
    assert (a != b).any()
    np.testing.assert_array_equal(a, np.asarray(generate(m, prompt, 16, temperature=2.0, seed=1)))
    stop = int(greedy[0, 1])
    stopped = np.asarray(generate(m, prompt[:1], 6, stop_tokens=(stop,)))
    first = list(stopped[0]).index(stop)
    assert (stopped[0, first:] == stop).all()
    with pytest.raises(ValueError, match="top_p"):
        generate(m, prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(m, prompt, 2, prompt_lengths=[5, 1])


@pytest.mark.parametrize(
    "convert, kind, max_rel_err, max_size",
    [
        (lambda m: quantize_model(m, bits=8), QuantizedWeight, 0.05, 0.35),
        (lambda m: quantize_model(m, bits=4), QuantizedWeight, 0.3, 0.2),
        (lambda m: quantize_model(m, bits=8, act_bits=8), QuantizedWeight, 0.06, 0.35),
        (  # per-channel W8A8
            lambda m: quantize_model(m, bits=8, act_bits=8, group_size=None),
            QuantizedWeight,
            0.06,
            0.35,
        ),
        (lambda m: sparsify_model(m, 0.5), SparseWeight, 0.8, 0.6),
    ],
)
def test_converted_models_stay_close_and_shrink(convert, kind, max_rel_err, max_size):
    config = TransformerConfig(
        vocab_size=64,
        embed_dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=256,
        sliding_window=8,
    )
    x = tokens((2, 16))
    dense = model(config)
    ref = dense(x)
    converted = convert(model(config))
    for path, layer in linears(converted):
        assert isinstance(layer.kernel.get_value(), kind) == path.startswith("blocks."), path
    err = float(jnp.abs(converted(x) - ref).max()) / float(jnp.abs(ref).max())
    assert err < max_rel_err
    block_bytes = lambda m: sum(  # noqa: E731
        layer.kernel.get_value().nbytes for p, layer in linears(m) if p.startswith("blocks.")
    )
    # Block weights vs the same weights in bf16.
    assert block_bytes(converted) < max_size * block_bytes(dense) / 2 * 2
    assert model_nbytes(converted) < model_nbytes(dense)


def test_family_options_convert_like_llama():
    """W8 and Wanda-50% conversions of the all-options model: biases and q/k norms stay
    dense, outputs stay close, generation runs through the converted kernels."""
    x = tokens((2, 16))
    dense = family_model()
    ref = np.asarray(dense(x))
    w8 = quantize_model(family_model(), bits=8)
    assert isinstance(w8.blocks[0].attention.q_proj.kernel.get_value(), QuantizedWeight)
    assert w8.blocks[0].attention.q_proj.bias.get_value().shape == (64,)
    assert np.abs(np.asarray(w8(x)) - ref).max() < 0.05 * np.abs(ref).max()
    sparse = sparsify_model(family_model(), 0.5, "wanda", calibration=x)
    assert isinstance(sparse.blocks[2].mlp.up_proj.kernel.get_value(), SparseWeight)
    assert np.abs(np.asarray(sparse(x)) - ref).max() < 0.8 * np.abs(ref).max()
    assert np.asarray(generate(sparse, x[:, :6], 3)).shape == (2, 3)


def test_wanda_and_lkd_conversions_use_calibration():
    x = tokens((2, 16))
    with pytest.raises(ValueError, match="needs calibration tokens"):
        sparsify_model(model(), 0.5, "wanda")
    wanda = sparsify_model(model(), 0.5, "wanda", calibration=x)
    magnitude = sparsify_model(model(), 0.5)
    masks = [
        (np.asarray(a.kernel.get_value().mask()), np.asarray(b.kernel.get_value().mask()))
        for (_, a), (_, b) in zip(linears(wanda), linears(magnitude), strict=True)
        if isinstance(a.kernel.get_value(), SparseWeight)
    ]
    assert any((ma != mb).any() for ma, mb in masks)
    lkd = quantize_model(model(), bits=4, method="lkd", calibration=x, lkd_steps=5)
    assert all(
        isinstance(layer.kernel.get_value(), QuantizedWeight)
        for p, layer in linears(lkd)
        if p.startswith("blocks.")
    )


def test_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        TransformerConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="layer_windows has 1 entries for 4 layers"):
        TransformerConfig(layer_windows=(4,))
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        TransformerConfig(sliding_window=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize(
    "mesh_sizes", [dict(data=2, tensor=2, sequence=2), dict(data=2, fsdp=2, tensor=2)]
)
def test_sharded_forward_and_generation_match_single_device(mesh_sizes):
    import dataclasses

    # Halo exchange for the windowed layers (ring for the global one): 2 kv
    # heads leave no room for Ulysses on tensor x sequence = 4.
    m = model(dataclasses.replace(CONFIG, sequence_method="halo"))
    x = tokens((4, 16))
    ref = np.asarray(m(x))
    ref_gen = np.asarray(generate(m, x[:, :6], 5))
    mesh = ps.make_mesh(**mesh_sizes)
    with jax.set_mesh(mesh):
        shard_model(m, mesh)
        up = m.blocks[0].mlp.up_proj.kernel.get_value()
        assert up.sharding.spec == ps.logical_to_spec(("embed", "mlp"))
        xs = jax.device_put(jnp.asarray(x), ps.named_sharding(mesh, ("batch", "length")))
        out = nnx.jit(lambda m, x: m(x))(m, xs)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4, rtol=2e-4)
        if mesh.shape["sequence"] == 1:
            np.testing.assert_array_equal(np.asarray(generate(m, x[:, :6], 5)), ref_gen)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize(
    "convert",
    [
        lambda m: quantize_model(m, bits=4),
        lambda m: quantize_model(m, bits=8, act_bits=8),
        lambda m: sparsify_model(m, 0.5),
    ],
    ids=["w4", "w8a8", "sparse50"],
)
def test_sharded_converted_models_match_single_device(convert):
    config = TransformerConfig(
        vocab_size=64,
        embed_dim=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=512,
        sliding_window=8,
        dtype="float32",
    )
    m = convert(model(config))
    x = tokens((4, 16))
    ref = np.asarray(m(x))
    ref_tokens = np.asarray(generate(m, x[:, :10], 8))
    mesh = ps.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        shard_model(m, mesh)
        up = m.blocks[0].mlp.up_proj.kernel.get_value()
        leaf = jax.tree.leaves(up)[0]
        assert leaf.addressable_shards[0].data.nbytes < leaf.nbytes  # really split
        out = nnx.jit(lambda m, x: m(x))(m, jnp.asarray(x))
        # Greedy generation past the window (8), weights gathered per layer.
        # (Not for W8A8: per-shard activation scales may flip a near-tie.)
        if m.blocks[0].mlp.down_proj.act_bits is None:
            got_tokens = np.asarray(generate(m, x[:, :10], 8))
            np.testing.assert_array_equal(got_tokens, ref_tokens)
    # Row-parallel W8A8 quantizes activations per tensor shard: small differences.
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mlp_activation", "relu", "mlp_activation 'relu' must be one of"),
        ("attention_logits_soft_cap", 0.0, "attention_logits_soft_cap must be a finite number"),
        ("final_logits_soft_cap", float("inf"), "final_logits_soft_cap must be a finite number"),
        ("query_pre_attn_scalar", True, "query_pre_attn_scalar must be a finite number"),
        ("local_rope_theta", -1.0, "local_rope_theta must be a finite number"),
        ("norm_weight_offset", 0.5, "norm_weight_offset must be 0"),
    ],
)
def test_family_option_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{field: value})
