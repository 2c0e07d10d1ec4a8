"""Quantized weights and matmul: exactness of the integer path, dequantized parity, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallax import testing
from pallax.pallas_kernels import (
    QuantizedWeight,
    QuantMatmulConfig,
    fake_quantize,
    lkd,
    quantize,
    quantize_activations,
    quantized_matmul,
)
from pallax.pallas_kernels import quantized_matmul_swap_mgpu as swap_mgpu


def weights(k, n, seed=0, scale=0.05):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)) * scale, jnp.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, n, group", [(256, 128, 128), (300, 70, 64), (512, 96, 512)])
def test_rounding_error_is_within_half_a_step(bits, symmetric, k, n, group):
    w = weights(k, n)
    qw = quantize(w, bits=bits, group_size=group, symmetric=symmetric)
    assert qw.shape == (k, n)
    err = np.abs(np.asarray(qw.dequantize()) - np.asarray(w))
    step = np.repeat(np.asarray(qw.scales), group, axis=1)[:n, :k].T
    assert (err <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_exactly_representable_weights_round_trip(bits):
    """Packing (two nibbles per byte along K) and scales are lossless on grid values."""
    rng = np.random.default_rng(1)
    k, n, group = 384, 130, 128
    limit = 2 ** (bits - 1) - 1
    q = rng.integers(-limit, limit + 1, (k, n))
    q[::group] = limit  # every group hits its absmax so the scale is exactly s
    scales = rng.uniform(0.5, 2.0, (k // group, n)).astype(np.float32)
    w = q * np.repeat(scales, group, axis=0)
    qw = quantize(jnp.asarray(w, jnp.float32), bits=bits, group_size=group)
    np.testing.assert_allclose(np.asarray(qw.dequantize()), w, rtol=1e-6)
    raw = np.asarray(qw.raw_values())[:n, :k].T - (8 if bits == 4 else 0)
    np.testing.assert_array_equal(raw, q)
    if bits == 4:
        assert qw.values.dtype == jnp.uint8 and qw.values.shape == (256, 384 // 2)


def test_nbytes_is_honest():
    qw = quantize(weights(4096, 4096), bits=4, group_size=128)
    assert qw.nbytes == 4096 * 4096 // 2 + 4096 * 32 * 4
    assert qw.nbytes < 4096 * 4096 * 2 / 3.5  # ~3.8x smaller than bf16
    asym = quantize(weights(4096, 4096), bits=8, group_size=128, symmetric=False)
    assert asym.nbytes == 4096 * 4096 + 2 * 4096 * 32 * 4


def test_activation_quantization_is_token_wise():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 64)), jnp.float32)
    q, s = quantize_activations(x)
    assert q.dtype == jnp.int8 and s.shape == (3, 5, 1)
    assert int(jnp.abs(q).max()) == 127
    np.testing.assert_allclose(np.asarray(q * s), np.asarray(x), atol=float(s.max()) / 2 + 1e-7)


def run_mosaic(x, qw, act_bits, config=None):
    f = functools.partial(
        quantized_matmul, act_bits=act_bits, implementation="mosaic", config=config
    )
    with testing.gpu_interpret():
        return jax.jit(f)(x, qw)


@pytest.mark.parametrize(
    "variant, m, k_splits",
    [("legacy", 70, 2), ("swap", 70, 2), ("swap", 5, 2), ("int8", 130, 1), (None, 70, 2)],
)
def test_w8a8_kernel_equals_int32_dot_rescaled(variant, m, k_splits):
    """Per-channel W8A8: y = s_x * s_w * (q_x . q_w) exactly, int32 accumulation
    (swap and int8 kernels: one int32 accumulator over each split's whole K)."""
    rng = np.random.default_rng(3)
    k, n = 384, 200
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    qw = quantize(weights(k, n), bits=8, group_size=None)
    assert qw.group_size == k and qw.scales.shape == (256, 1)
    qx, sx = quantize_activations(x)
    w_int = np.asarray(qw.values)[:n, :k].T
    int_dot = jnp.dot(qx, jnp.asarray(w_int), preferred_element_type=jnp.int32)
    expected = np.asarray(int_dot, np.float64) * np.asarray(sx) * np.asarray(qw.scales)[:n, 0]
    got = run_mosaic(x, qw, 8, QuantMatmulConfig(k_splits=k_splits, variant=variant))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)
    ref = quantized_matmul(x, qw, act_bits=8, implementation="xla")
    np.testing.assert_allclose(np.asarray(ref), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "variant, dtype, k_splits",
    [
        ("legacy", jnp.float32, 2),
        ("swap", jnp.float32, 2),
        ("int8", jnp.float32, 2),
        ("int8", jnp.bfloat16, 1),  # bf16 written by the kernel itself
    ],
)
def test_group_wise_w8a8_kernel_equals_the_int32_reference(variant, dtype, k_splits):
    """Group-wise W8A8 (the int8 kernel converts each block's int32 sum with the
    magic-number add, not a convert instruction)."""
    rng = np.random.default_rng(8)
    m, k, n = 9, 512, 192
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    qw = quantize(weights(k, n), bits=8, group_size=128)
    got = run_mosaic(x, qw, 8, QuantMatmulConfig(k_splits=k_splits, variant=variant))
    assert got.dtype == dtype
    ref = quantized_matmul(x.astype(jnp.float32), qw, act_bits=8, implementation="xla")
    rtol = 1e-5 if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=rtol, atol=1e-4)


def test_small_int32_to_float_is_exact_below_2_to_the_22():
    from pallax.pallas_kernels import quantized_matmul_int8_mgpu as int8_mgpu

    edge = 2**22 - 1
    acc = jnp.asarray([0, 1, -1, 127 * 127 * 128, -127 * 127 * 128, edge, -edge, 12345], jnp.int32)
    got = int8_mgpu.small_int32_to_float(acc)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(acc, np.float32))


WEIGHT_ONLY_CASES = [
    (1, 512, 256, 4, True, jnp.bfloat16),  # decode, W4A16
    (5, 300, 200, 8, True, jnp.bfloat16),  # odd K and N, W8A16
    (16, 2048, 130, 4, False, jnp.float16),  # asymmetric int4 (zero points), fp16, 2 slabs
    (3, 384, 128, 8, False, jnp.float32),  # asymmetric int8; fp32 input computes in bf16
]


@pytest.mark.parametrize(
    "variant, m, k, n, bits, symmetric, dtype",
    [("swap", *case) for case in WEIGHT_ONLY_CASES]
    + [
        ("legacy", 1, 512, 256, 4, True, jnp.bfloat16),
        ("legacy", 70, 256, 130, 4, False, jnp.float16),
    ]
    + [(None, 70, 256, 130, 8, True, jnp.bfloat16)],  # > 64 tokens: the legacy kernel
)
def test_weight_only_kernel_matches_dequantized_reference(variant, m, k, n, bits, symmetric, dtype):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    qw = quantize(weights(k, n), bits=bits, group_size=128, symmetric=symmetric)
    got = run_mosaic(x, qw, None, QuantMatmulConfig(k_splits=2, variant=variant))
    assert got.dtype == dtype and got.shape == (m, n)
    # Both kernels round the dequantized weight (and x) to the compute dtype
    # once; what is left is accumulation order and the output's rounding.
    compute = jnp.float16 if dtype == jnp.float16 else jnp.bfloat16
    x_c = np.asarray(x.astype(compute), np.float32)
    expected = x_c @ np.asarray(qw.dequantize(compute), np.float32)
    tol = 5e-3 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=tol)


@pytest.mark.parametrize(
    "variant, bits, symmetric, act_bits, group_size, m",
    [
        ("swap", 4, False, None, 128, 16),  # staging double buffer, slabs, 2 splits
        ("swap", 8, True, 8, None, 8),  # per-channel int32 accumulator, async
        ("int8", 8, True, 8, 128, 130),  # two compute warpgroups
    ],
)
def test_new_kernels_have_no_races(variant, bits, symmetric, act_bits, group_size, m):
    """Slots released one wgmma late (async), staging reused every other step."""
    rng = np.random.default_rng(9)
    k, n = 1024, 128
    qw = quantize(weights(k, n), bits=bits, group_size=group_size, symmetric=symmetric)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    f = functools.partial(
        quantized_matmul,
        act_bits=act_bits,
        implementation="mosaic",
        config=QuantMatmulConfig(k_splits=2, variant=variant),
    )
    with testing.gpu_interpret(detect_races=True):
        got = np.asarray(jax.jit(f)(x, qw), np.float32)
    assert not testing.races_detected()
    expected = np.asarray(quantized_matmul(x.astype(jnp.float32), qw, act_bits=act_bits))
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())


SPLIT_K_CASES = {
    # Scales streamed per K block (group 256: no slab), 4 splits of one block.
    "swap": dict(m=5, k=512, group_size=256, act_bits=None, k_splits=4),
    # Scale slabs of 8 blocks: 3 splits, the last one short.
    "swap-slabs": dict(m=16, k=2560, group_size=128, act_bits=None, k_splits=3),
    # tma_add keeps 3 splits of 3 blocks (whole slabs would leave one): each
    # reads the slab at the multiple of 8 below its start (zero points too).
    "swap-offset-slabs": dict(
        m=3, k=1024, group_size=128, act_bits=None, k_splits=3, symmetric=False
    ),
    "legacy": dict(m=9, k=384, group_size=128, act_bits=None, k_splits=3),
    "int8": dict(m=9, k=384, group_size=128, act_bits=8, k_splits=3),
}


@pytest.mark.parametrize("reduction", ["tma_add", "partials"])
@pytest.mark.parametrize("case", list(SPLIT_K_CASES))
def test_split_k_reductions_match_the_reference(case, reduction):
    """Several K splits per output tile, reduce-added by TMA into one fp32
    accumulator or written as partials and summed by XLA."""
    spec = SPLIT_K_CASES[case]
    rng = np.random.default_rng(11)
    m, k, n = spec["m"], spec["k"], 192
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    bits = 4 if spec["act_bits"] is None else 8
    symmetric = spec.get("symmetric", True)
    qw = quantize(weights(k, n), bits=bits, group_size=spec["group_size"], symmetric=symmetric)
    config = QuantMatmulConfig(
        variant=case.split("-")[0], k_splits=spec["k_splits"], split_k_reduction=reduction
    )
    got = np.asarray(run_mosaic(x, qw, spec["act_bits"], config), np.float32)
    expected = np.asarray(
        quantized_matmul(x.astype(jnp.float32), qw, act_bits=spec["act_bits"]), np.float32
    )
    np.testing.assert_allclose(got, expected, atol=1e-2 * np.abs(expected).max())


def test_vmapped_tma_add_matmul_equals_a_loop():
    """Under vmap the in-kernel reduction (a run_state ref, no batching rule)
    sums partials instead; the result equals the unmapped calls."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((3, 5, 512)), jnp.bfloat16)
    qw = quantize(weights(512, 192), bits=4, group_size=128)
    config = QuantMatmulConfig(k_splits=2, split_k_reduction="tma_add")
    f = functools.partial(quantized_matmul, implementation="mosaic", config=config)
    with testing.gpu_interpret():
        vmapped = np.asarray(jax.jit(jax.vmap(f, in_axes=(0, None)))(x, qw), np.float32)
        looped = [np.asarray(jax.jit(f)(x[i], qw), np.float32) for i in range(3)]
    np.testing.assert_allclose(vmapped, np.stack(looped), rtol=0, atol=1e-2)


def test_split_plan_fills_the_gpu_when_splits_cost_no_bytes():
    """(splits, blocks per split, slab width) of the swap kernel at M <= 16."""

    def plan(k, n, reduction):
        qw = jax.eval_shape(
            functools.partial(quantize, bits=4, group_size=128),
            jax.ShapeDtypeStruct((k, n), jnp.float32),
        )
        tiles = qw.values.shape[0] // swap_mgpu.ROWS
        config = swap_mgpu.SwapConfig()
        return swap_mgpu.split_plan(qw, k // 128, tiles, config, reduction, False)

    # 2048 x 2048: whole slabs give 2 splits x 32 tiles = 64 CTAs on 132 SMs;
    # tma_add splits 8 ways (256 CTAs), each reading an 8-column slab.
    assert plan(2048, 2048, "partials") == (2, 8, 8)
    assert plan(2048, 2048, "tma_add") == (8, 2, 8)
    # Enough CTAs with whole slabs: unchanged.
    assert plan(4096, 4096, "tma_add") == plan(4096, 4096, "partials") == (4, 8, 8)
    assert plan(14336, 4096, "tma_add") == (5, 24, 24)
    # 12 groups cannot be an 8-column tiled TMA box: scales streamed per block.
    assert plan(1536, 1536, "tma_add")[2] is None


def test_split_k_falls_back_to_partials_without_simulated_tma_reductions(monkeypatch):
    """jax's GPU interpret mode alone (no pallax.testing patch) has no TMA
    reductions: the default becomes "partials"; asking for "tma_add" is an error."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    from pallax.pallas_kernels import _mgpu

    assert _mgpu.split_k_reduction_for(None) == "tma_add"  # not interpreting: a GPU
    monkeypatch.setattr(
        gpu_callbacks, "copy_smem_to_gmem", gpu_callbacks.copy_smem_to_gmem.__wrapped__
    )
    x = jnp.asarray(np.random.default_rng(12).standard_normal((5, 512)), jnp.bfloat16)
    qw = quantize(weights(512, 128), bits=4, group_size=256)
    with testing.gpu_interpret():
        assert not _mgpu.tma_reductions_available()
        assert _mgpu.split_k_reduction_for(None) == "partials"
    got = run_mosaic(x, qw, None, QuantMatmulConfig(k_splits=4))
    expected = np.asarray(quantized_matmul(x.astype(jnp.float32), qw), np.float32)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), expected, atol=1e-2 * abs(expected).max()
    )
    with pytest.raises(ValueError, match="split_k_reduction='tma_add' needs TMA reductions"):
        run_mosaic(x, qw, None, QuantMatmulConfig(k_splits=4, split_k_reduction="tma_add"))
    with pytest.raises(ValueError, match="split_k_reduction='atomic' must be one of"):
        QuantMatmulConfig(split_k_reduction="atomic")


@pytest.mark.parametrize("bits, signed", [(4, False), (8, True), (8, False)])
def test_bit_trick_dequantization_is_exact_for_every_code(bits, signed):
    """The swap kernel's dequantization (no int-to-float convert, the zero point
    folded into one FMA) equals ``(raw - z) * s`` for every stored integer."""
    if bits == 4:  # every byte: low nibble, high nibble
        stored = np.arange(256)
        codes = [stored & 15, stored >> 4]
        zero = np.asarray([[0.0, 8.0, 3.0, 15.0]])
    else:
        stored = np.arange(-128, 128) if signed else np.arange(256)
        codes = [stored + 128] if signed else [stored]
        zero = np.asarray([[128.0] * 4]) if signed else np.asarray([[0.0, 8.0, 128.0, 255.0]])
    s = np.asarray([[1.0, 0.0123, 3.7e-4, 2.5]], np.float32)
    raw = jnp.broadcast_to(jnp.asarray(stored, jnp.int32)[:, None], (256, 4))
    mult = jnp.asarray(2 * s)
    bias = jnp.asarray(-(256.0 + zero) * s, jnp.float32)
    patterns = swap_mgpu.magic_patterns(raw, bits, signed)
    for pattern, code in zip(patterns, codes, strict=True):
        expected = (code[:, None] - zero) * s.astype(np.float64)
        got = swap_mgpu.dequantize_patterns(pattern, mult, bias, jnp.float32)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * s.max())
        got_bf16 = swap_mgpu.dequantize_patterns(pattern, mult, bias, jnp.bfloat16)
        np.testing.assert_array_equal(
            np.asarray(got_bf16, np.float32),
            np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16), np.float32),
        )


def test_dispatch_picks_the_swap_kernel_for_few_tokens():
    config = QuantMatmulConfig()
    assert [config.variant_for(m) for m in (1, 16, 64, 65, 4096)] == ["swap"] * 3 + ["legacy"] * 2
    assert config.variant_for(64, w8a8=True) == "swap"
    assert config.variant_for(4096, w8a8=True) == "int8"
    with pytest.raises(ValueError, match="variant='int8' is the W8A8 kernel"):
        QuantMatmulConfig(variant="int8").variant_for(4096)
    assert QuantMatmulConfig(variant="legacy").variant_for(1) == "legacy"
    assert QuantMatmulConfig(swap_max_tokens=0).variant_for(1) == "legacy"
    with pytest.raises(ValueError, match="variant='fast' must be one of"):
        QuantMatmulConfig(variant="fast")
    with pytest.raises(ValueError, match="block_m=12 must be a multiple of 8"):
        QuantMatmulConfig(block_m=12)


def test_gradient_flows_to_x_only():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 256)), jnp.float32)
    qw = quantize(weights(256, 64), bits=4)
    dy = jnp.ones((2, 3, 64))
    loss = lambda x, qw: jnp.sum(quantized_matmul(x, qw) * dy)  # noqa: E731
    dx, dqw = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, qw)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dy @ qw.dequantize().T), rtol=1e-5)
    assert float(jnp.abs(dqw.scales).max()) == 0.0


def test_fake_quantize_is_straight_through():
    w = weights(128, 32)
    g = jax.grad(lambda w: jnp.sum(fake_quantize(w, bits=4) * 3.0))(w)
    np.testing.assert_allclose(np.asarray(g), 3.0)


def test_lkd_beats_round_to_nearest_on_calibration_data():
    rng = np.random.default_rng(6)
    w = weights(256, 64, seed=7)
    # Correlated activations (a few dominant channels), where RTN is far from optimal.
    x = rng.standard_normal((512, 256)) * np.where(rng.random(256) < 0.05, 8.0, 1.0)
    x = jnp.asarray(x, jnp.float32)

    def output_mse(qw):
        return float(jnp.mean((x @ qw.dequantize() - x @ w) ** 2))

    rtn = quantize(w, bits=4, group_size=128)
    distilled = lkd(w, x, bits=4, group_size=128, steps=200)
    assert output_mse(distilled) < output_mse(rtn)
    # Same scales, only rounding decisions change.
    np.testing.assert_array_equal(np.asarray(distilled.scales), np.asarray(rtn.scales))
    assert (np.asarray(distilled.values) != np.asarray(rtn.values)).any()


def test_quantized_weight_is_a_pytree_nnx_can_hold():
    class Layer(nnx.Module):
        def __init__(self, w):
            self.w = nnx.Param(quantize(w, bits=4))

        def __call__(self, x):
            return quantized_matmul(x, self.w.get_value())

    layer = Layer(weights(256, 64))
    x = jnp.ones((2, 256))
    y = nnx.jit(lambda layer, x: layer(x))(layer, x)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x @ layer.w.get_value().dequantize()), rtol=1e-5, atol=1e-5
    )
    _, state = nnx.split(layer)
    assert isinstance(state["w"].get_value(), QuantizedWeight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=3), "bits must be 4 or 8"),
        (dict(group_size=100), "group_size=100 must divide or be a multiple of 128"),
        (dict(group_size=0), "group_size must be a positive int"),
    ],
)
def test_bad_quantize_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(weights(256, 64), **kwargs)


def test_bad_matmul_arguments():
    qw4 = quantize(weights(256, 64), bits=4)
    asym = quantize(weights(256, 64), bits=8, symmetric=False)
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x \(2, 100\) does not match weight in_features 256"):
        quantized_matmul(jnp.ones((2, 100)), qw4)
    with pytest.raises(ValueError, match="act_bits=8 needs 8-bit weights, got bits=4"):
        quantized_matmul(x, qw4, act_bits=8)
    with pytest.raises(ValueError, match="W8A8 .* needs a symmetric weight"):
        quantized_matmul(x, asym, act_bits=8)
    with pytest.raises(ValueError, match="act_bits must be None or 8"):
        quantized_matmul(x, qw4, act_bits=4)
    with pytest.raises(ValueError, match="expected a QuantizedWeight"):
        quantized_matmul(x, jnp.ones((256, 64)))
    with pytest.raises(ValueError, match="x must be bf16/fp16/fp32"):
        quantized_matmul(jnp.ones((2, 256), jnp.int32), qw4)
    with pytest.raises(ValueError, match="group_size=64 .*needs >= 128"):
        quantized_matmul(x, quantize(weights(256, 64), group_size=64), implementation="mosaic")
    with pytest.raises(ValueError, match="2D"):
        quantize(jnp.ones((4, 4, 4)))
