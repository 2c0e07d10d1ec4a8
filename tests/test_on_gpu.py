"""Every Mosaic kernel against its XLA path on a real Hopper GPU, at model shapes.

Skipped elsewhere (the rest of the suite runs the kernels in GPU interpret mode
and lowers them for CUDA). On an H100/H200:

    JAX_PLATFORMS=cuda python -m pytest -q tests/test_on_gpu.py

(conftest.py pins the CPU unless JAX_PLATFORMS is set.) Errors are relative
Frobenius norms against an fp32 XLA computation of the same product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv

from pallax.pallas_kernels import (
    decode_attention,
    dot_product_attention,
    quantize,
    quantized_matmul,
    sparse_matmul,
    sparsify,
)
from pallax.pallas_kernels._dispatch import on_hopper
from pallax.pallas_kernels.sparse_matmul_mgpu import DECODES, SpmmConfig

pytestmark = pytest.mark.skipif(
    not on_hopper(), reason="needs a Hopper GPU (JAX_PLATFORMS=cuda on an H100/H200)"
)


def relative_error(got, expected):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(got).all(), "non-finite values in the kernel's output"
    return np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)


def assert_attention_matches_xla(q, k, v, do, config=None, **attention_kwargs):
    """Mosaic's forward and gradients of ``sum(out * do)`` against XLA's in fp32."""

    def loss(q, k, v, implementation):
        out = dot_product_attention(
            q,
            k,
            v,
            implementation=implementation,
            config=config if implementation == "mosaic" else None,
            **attention_kwargs,
        )
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (dq, dk, dv), out = grad(q, k, v, "mosaic")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (dq_ref, dk_ref, dv_ref), out_ref = grad(*f32, "xla")
    assert relative_error(out, out_ref) < 1e-2
    for got, expected in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert relative_error(got, expected) < 2e-2


@pytest.mark.parametrize(
    "seq, heads, kv_heads, head_dim, causal, window",
    [
        (2048, 16, 4, 128, True, None),
        (2048, 16, 4, 128, True, (512, 0)),
        (1536, 8, 8, 64, False, (256, 256)),
        (1000, 8, 2, 128, True, (300, 0)),  # not a multiple of the blocks
    ],
)
def test_attention_forward_and_backward(seq, heads, kv_heads, head_dim, causal, window):
    q, k, v, do = random_qkv(0, 2, seq, seq, heads, kv_heads, head_dim, jnp.bfloat16)
    assert_attention_matches_xla(q, k, v, do, is_causal=causal, local_window_size=window)


@pytest.mark.parametrize(
    "head_dim, window", [(128, (1023, 0)), (128, None), (256, (4095, 0)), (64, (255, 0))]
)
def test_soft_capped_attention_forward_and_backward(head_dim, window):
    """Gemma 2's logit soft cap: scale 1 makes logits ~sqrt(head_dim) against a cap of 5."""
    q, k, v, do = random_qkv(3, 1, 2048, 2048, 8, 4, head_dim, jnp.bfloat16)

    assert_attention_matches_xla(
        q, k, v, do, scale=1.0, is_causal=True, local_window_size=window, logits_soft_cap=5.0
    )


@pytest.mark.parametrize("p_operand", ["registers", "smem"])
@pytest.mark.parametrize(
    "head_dim, window, cap", [(64, None, None), (128, 512, 30.0), (256, None, None)]
)
def test_attention_operand_paths(p_operand, head_dim, window, cap):
    """Both A-operand paths (register P / dS, the GPU default, and SMEM staging, the one
    interpret mode checks on CPU) against XLA: the register path only runs here."""
    import dataclasses

    from pallax.pallas_kernels import AttentionConfig

    q, k, v, do = random_qkv(4, 1, 1536, 1536, 8, 2, head_dim, jnp.bfloat16)
    config = dataclasses.replace(AttentionConfig.for_head_dim(head_dim), p_operand=p_operand)

    assert_attention_matches_xla(
        q, k, v, do, config=config, is_causal=True, local_window_size=window, logits_soft_cap=cap
    )


@pytest.mark.parametrize("rolling", [False, True])
def test_soft_capped_decode_attention(rolling):
    batch, heads, kv_heads, head_dim, cache_len = 4, 8, 4, 256, 4096
    q, k, v, _ = random_qkv(4, batch, 1, cache_len, heads, kv_heads, head_dim, jnp.bfloat16)
    lengths = jnp.asarray([1, 900, 3000, 9 * cache_len if rolling else cache_len], jnp.int32)
    run = jax.jit(
        lambda q, k, v, implementation: decode_attention(
            q,
            k,
            v,
            lengths,
            scale=1.0 / 16,
            local_window_size=cache_len - 1 if rolling else None,
            rolling=rolling,
            logits_soft_cap=1.0,
            implementation=implementation,
        ),
        static_argnums=3,
    )
    got = run(q, k, v, "mosaic")
    expected = run(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
    assert relative_error(got, expected) < 1e-2


@pytest.mark.parametrize(
    "num_new, window, rolling, cache_len",
    [(1, None, False, 4096), (4, 1024, False, 4096), (1, 1024, True, 1040)],
)
def test_decode_attention(num_new, window, rolling, cache_len):
    batch, heads, kv_heads, head_dim = 4, 32, 8, 128
    q, k, v, _ = random_qkv(1, batch, num_new, cache_len, heads, kv_heads, head_dim, jnp.bfloat16)
    # Short, mid, long and full sequences; a rolling cache also holds ones
    # longer than itself.
    lengths = [num_new, cache_len // 5, cache_len * 3 // 4, cache_len]
    if rolling:
        lengths[-1] = 9 * cache_len
    lengths = jnp.asarray(lengths, jnp.int32)
    run = jax.jit(
        lambda q, k, v, implementation: decode_attention(
            q,
            k,
            v,
            lengths,
            local_window_size=window,
            rolling=rolling,
            implementation=implementation,
        ),
        static_argnums=3,
    )
    got = run(q, k, v, "mosaic")
    expected = run(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
    assert relative_error(got, expected) < 1e-2


@pytest.mark.parametrize("m", [1, 16, 4096])
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336)])
@pytest.mark.parametrize(
    "bits, act_bits, symmetric, group_size",
    [(8, None, True, 128), (4, None, True, 128), (4, None, False, 128), (8, 8, True, 128)]
    + [(8, 8, True, None)],  # per-channel W8A8
)
@pytest.mark.parametrize("variant", [None, "legacy"])  # None: the kernel the dispatch picks
def test_quantized_matmul(m, k, n, bits, act_bits, symmetric, group_size, variant):
    from pallax.pallas_kernels import QuantMatmulConfig

    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    qw = quantize(w, bits=bits, group_size=group_size, symmetric=symmetric)
    config = QuantMatmulConfig(variant=variant)
    run = jax.jit(
        lambda x, qw, implementation: quantized_matmul(
            x, qw, act_bits=act_bits, implementation=implementation, config=config
        ),
        static_argnums=2,
    )
    expected = run(x.astype(jnp.float32), qw, "xla")
    assert relative_error(run(x, qw, "mosaic"), expected) < 1e-2


@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("decode", DECODES)
def test_sparse_matmul(m, k, n, sparsity, decode):
    rng = np.random.default_rng(3)
    w = sparsify(jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), sparsity)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    run = jax.jit(
        lambda x, w, implementation: sparse_matmul(
            x, w, implementation=implementation, config=SpmmConfig(decode=decode)
        ),
        static_argnums=2,
    )
    expected = run(x.astype(jnp.float32), w, "xla")
    assert relative_error(run(x, w, "mosaic"), expected) < 1e-2


def test_sparse_self_check_passes():
    from pallax.pallas_kernels import sparse

    assert sparse._mosaic_self_check.__wrapped__()


@pytest.mark.parametrize("kernel", ["w4a16", "spmm90"])
@pytest.mark.parametrize("k, n", [(2048, 2048), (4096, 4096)])
def test_split_k_reductions_agree(kernel, k, n):
    """TMA reduce-add (the default) and XLA-summed partials at decode shapes with
    several splits: both match XLA; partials are bitwise reproducible."""
    from pallax.pallas_kernels import QuantMatmulConfig

    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, k)), jnp.bfloat16)
    if kernel == "w4a16":
        weight = quantize(w, bits=4)
        op, config_cls = quantized_matmul, QuantMatmulConfig
    else:
        weight = sparsify(w.astype(jnp.bfloat16), 0.9)
        op, config_cls = sparse_matmul, SpmmConfig

    def run(reduction):
        config = config_cls(split_k_reduction=reduction)
        return jax.jit(lambda x, w: op(x, w, implementation="mosaic", config=config))(x, weight)

    expected = op(x.astype(jnp.float32), weight, implementation="xla")
    for reduction in ("tma_add", "partials"):
        assert relative_error(run(reduction), expected) < 1e-2, reduction
    np.testing.assert_array_equal(np.asarray(run("partials")), np.asarray(run("partials")))
