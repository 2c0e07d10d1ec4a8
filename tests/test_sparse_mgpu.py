"""The Mosaic GPU sparse matmul: its decode, in GPU interpret mode, and lowered for CUDA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from pallax import testing
from pallax.pallas_kernels import SparseWeight, sparse_matmul, sparsify, split_sparse
from pallax.pallas_kernels import sparse_matmul_mgpu as sm
from pallax.pallas_kernels.sparse import _tile_major


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def imbalanced_weight(k, n, density, seed=0, dtype=jnp.bfloat16):
    """Random sparsity plus a full tile, an empty tile, an empty row and column."""
    rng = np.random.default_rng(seed)
    w = rand((k, n), seed) * (rng.random((k, n)) < density)
    w[:64, :64] = rand((64, 64), seed + 1)  # 4096 nonzeros: spans 17 ring chunks
    if k >= 128 and n >= 128:
        w[64:128, 64:128] = 0
    w[:, n // 2] = 0
    w[k // 3, :] = 0
    return SparseWeight.from_dense(w.astype(dtype))


@pytest.mark.parametrize("strategy", sm.DECODES)
@pytest.mark.parametrize("shift", [0, 1000, sm.RING - 700])  # the last wraps the ring
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_decode_tile_matches_dense(shift, density, strategy):
    """The thread-level decode (jnp backend), fed a ring as the kernel sees it."""
    w = imbalanced_weight(192, 128, density)
    dense_t = np.asarray(w.todense(), np.float32).T
    for n_tile, k_tile in [(0, 0), (1, 1), (1, 2), (0, 2)]:
        start = int(w.tile_offsets[n_tile, k_tile, 0])
        values = np.asarray(w.values[start : start + 4096])
        ring = np.zeros(sm.RING, values.dtype)
        ring[(np.arange(values.shape[0]) + start + shift) % sm.RING] = values
        tile = sm.decode_tile_reference(
            w.bitmap[n_tile, k_tile],
            jnp.asarray(ring),
            w.tile_offsets[n_tile, k_tile] + shift,
            jnp.bfloat16,
            strategy,
        )
        rows, cols = slice(64 * n_tile, 64 * n_tile + 64), slice(64 * k_tile, 64 * k_tile + 64)
        np.testing.assert_array_equal(np.asarray(tile, np.float32), dense_t[rows, cols])


def test_swizzled_offsets_are_a_permutation_of_16_byte_chunks():
    for cols in (64, 128):
        seen = set()
        for row in range(64):
            for col in range(0, cols, 8):
                off = sm.swizzled_offset(row, col, cols)
                assert off % 8 == 0 and 0 <= off < 64 * cols
                # Same 8x64 tile and same 128-byte row as the unswizzled address.
                tile = (row // 8) * (cols // 64) + col // 64
                assert off // 512 == tile and (off % 512) // 64 == row % 8
                seen.add(off)
        assert len(seen) == 64 * cols // 8
    assert sm.swizzled_offset(1, 0, 64) == 64 + 8  # chunk 0 of row 1 moves to chunk 1
    # Single elements (the "bits" decode) keep their place inside the chunk.
    assert sm.swizzled_offset(1, 5, 64) == 64 + 8 + 5
    assert sm.swizzled_offset(9, 70, 128) == sm.swizzled_offset(9, 64, 128) + 6


def test_configs_that_overflow_shared_memory_are_rejected_up_front():
    w = imbalanced_weight(256, 128, 0.3, dtype=jnp.float32)
    x = jnp.zeros((256, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"block_m=256, max_concurrent_steps=4.*float32"):
        sm.matmul(x, w, config=sm.SpmmConfig(block_m=256))


@pytest.mark.parametrize(
    "density, expected", [(0.05, "bits"), (0.25, "bits"), (0.3, "dense"), (1.0, "dense")]
)
def test_decode_strategy_follows_density(density, expected):
    assert sm.SpmmConfig().decode_for(density) == expected
    assert sm.SpmmConfig(decode="dense").decode_for(density) == "dense"
    with pytest.raises(ValueError, match="decode='scatter'"):
        sm.SpmmConfig(decode="scatter")


def test_chunk_ranges_cover_each_tile_once():
    """Both warpgroups walk the values ring with _chunk_range: every tile's
    nonzeros lie in chunks that were fetched, each chunk fetched once."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4097, size=40)
    counts[[3, 4, 10]] = 0  # empty tiles
    ends = np.cumsum(counts)
    starts = ends - counts
    g_hi, fetched = 0, []
    for start, end in zip(starts, ends, strict=True):
        n_new, g_hi = (int(v) for v in sm._chunk_range(start, end, g_hi))
        fetched += range(g_hi - n_new, g_hi)
        if end > start:
            assert set(range(start // sm.CHUNK, -(-end // sm.CHUNK))) <= set(fetched)
        assert n_new <= 17
    assert fetched == sorted(set(fetched))


def interpret_matmul(x, w, **config):
    with testing.gpu_interpret():
        return np.asarray(sm.matmul(x, w, config=sm.SpmmConfig(**config)))


@pytest.mark.parametrize(
    "k, n, m, density, config",
    [
        (300, 130, 5, 0.3, {}),
        (256, 64, 1, 0.02, {"k_splits": 2}),
        (192, 128, 24, 0.5, {"block_m": 8}),  # 3 token tiles
        (320, 64, 3, 0.9, {}),  # 5 tiles of ~3700 nonzeros: the ring wraps
        # The set-bit decode: picked by density, and forced on dense-ish tiles.
        (300, 130, 5, 0.1, {}),
        (320, 64, 3, 0.9, {"decode": "bits"}),
        (192, 128, 24, 0.05, {"decode": "dense", "block_m": 8}),
    ],
)
def test_kernel_matches_scipy_in_interpret_mode(k, n, m, density, config):
    w = imbalanced_weight(k, n, density)
    x = rand((m, k), seed=5)
    kp = w.bitmap.shape[1] * 64
    x_pad = jnp.pad(jnp.asarray(x, jnp.bfloat16), ((0, 0), (0, kp - k)))
    got = interpret_matmul(x_pad, w, **config)[:, :n]
    csr = scipy.sparse.csr_matrix(np.asarray(w.todense(), np.float32))
    expected = (csr.T @ np.asarray(x_pad[:, :k], np.float32).T).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "x_dtype, values_dtype",
    [
        (jnp.float16, jnp.float16),
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.bfloat16),
        (jnp.bfloat16, jnp.float16),
    ],
)
def test_public_op_in_interpret_mode_with_other_dtypes_and_batch_dims(x_dtype, values_dtype):
    w = imbalanced_weight(128, 96, 0.2, dtype=values_dtype)
    x = jnp.asarray(rand((2, 3, 128), seed=2), x_dtype)
    with testing.gpu_interpret():
        got = sparse_matmul(x, w, implementation="mosaic")
    assert got.shape == (2, 3, 96) and got.dtype == x_dtype
    expected = sparse_matmul(x, w, implementation="xla")
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=2e-2
    )


def test_no_races_and_zero_sparsity():
    w = SparseWeight.from_dense(rand((128, 64)).astype(jnp.bfloat16))  # every tile full
    x = jnp.asarray(rand((4, 128), seed=1), jnp.bfloat16)
    with testing.gpu_interpret(detect_races=True):
        got = np.asarray(sm.matmul(x, w))
    assert not testing.races_detected()
    expected = np.asarray(x, np.float32) @ np.asarray(w.todense(), np.float32)
    np.testing.assert_allclose(got[:, :64], expected, rtol=1e-5, atol=1e-4)


def test_gradients_through_the_kernel():
    w = sparsify(rand((128, 64)), 0.6)
    w = w.with_values(w.values.astype(jnp.bfloat16))
    x = jnp.asarray(rand((6, 128), seed=3), jnp.bfloat16)
    dy = jnp.asarray(rand((6, 64), seed=4), jnp.float32)

    def loss(x, values, implementation):
        y = sparse_matmul(x, w.with_values(values), implementation=implementation)
        return jnp.sum(y.astype(jnp.float32) * dy)

    with testing.gpu_interpret():
        dx, dv = jax.grad(loss, argnums=(0, 1))(x, w.values, "mosaic")
    mask = np.asarray(w.mask())
    dense = np.asarray(w.todense(), np.float32)
    np.testing.assert_allclose(
        np.asarray(dx, np.float32), np.asarray(dy) @ dense.T, rtol=2e-2, atol=1e-1
    )
    dw = np.asarray(x, np.float32).T @ np.asarray(dy)
    expected_dv = _tile_major(np.pad(dw * mask, ((0, 0), (0, 0))).T)[_tile_major(mask.T)]
    np.testing.assert_allclose(np.asarray(dv, np.float32), expected_dv, rtol=2e-2, atol=5e-2)


# The shapes the models and benchmarks send to the kernel: Llama-7B/8B-like
# projections and an OPT-30B one, decode-sized token counts, 70% and 90% sparsity.
@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize(
    "k, n",
    [
        (4096, 4096),
        (4096, 14336),
        (14336, 4096),
        (7168, 28672),
        # The demo presets' projections (tiny's 688 is not a multiple of 64).
        (512, 256),
        (512, 1408),
        (1408, 512),
        (256, 688),
    ],
)
@pytest.mark.parametrize("values_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("density", [0.3, 0.1])  # the "dense" and the "bits" decode
def test_kernel_lowers_for_cuda(m, k, n, values_dtype, density):
    nnz = int(density * k * n)
    n_tiles, k_tiles = -(-n // 64), -(-k // 64)
    w = SparseWeight(
        values=jax.ShapeDtypeStruct((nnz,), values_dtype),
        bitmap=jax.ShapeDtypeStruct((n_tiles, k_tiles, 128), jnp.uint32),
        tile_offsets=jax.ShapeDtypeStruct((n_tiles, k_tiles, 4), jnp.int32),
        in_features=k,
        out_features=n,
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    run = functools.partial(sparse_matmul, implementation="mosaic")
    grad = jax.value_and_grad(lambda x, w: run(x, w).astype(jnp.float32).sum())
    exported = testing.lower_for_cuda(grad, x, w)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("values_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("density", [0.3, 0.1])
def test_every_dtype_pair_lowers_for_cuda(x_dtype, values_dtype, density):
    """The decode converts values to x's dtype (bf16 <-> fp16 through fp32)."""
    k, n = 512, 256
    w = SparseWeight(
        values=jax.ShapeDtypeStruct((int(density * k * n),), values_dtype),
        bitmap=jax.ShapeDtypeStruct((n // 64, k // 64, 128), jnp.uint32),
        tile_offsets=jax.ShapeDtypeStruct((n // 64, k // 64, 4), jnp.int32),
        in_features=k,
        out_features=n,
    )
    x = jax.ShapeDtypeStruct((16, k), x_dtype)
    run = functools.partial(sparse_matmul, implementation="mosaic")
    assert "mosaic_gpu" in testing.lower_for_cuda(run, x, w).mlir_module()


def test_gpu_self_check_passes_in_interpret_mode():
    from pallax.pallas_kernels import sparse

    with testing.gpu_interpret():
        assert sparse._self_check_products() is None


def test_gpu_self_check_rejects_a_wrong_decode(monkeypatch):
    """A decode that is wrong on the device turns the kernel off, with a warning."""
    from pallax.pallas_kernels import sparse

    real = sm.decode_tile_reference

    def doubled_bits(words, ring, starts, dtype, strategy="dense"):
        tile = real(words, ring, starts, dtype, strategy)
        return tile * 2 if strategy == "bits" else tile

    monkeypatch.setattr(sm, "decode_tile_reference", doubled_bits)
    jax.clear_caches()  # not the product traced by the passing self-check
    with testing.gpu_interpret():
        reason = sparse._self_check_products()
    assert reason is not None and "bits decode" in reason
    jax.clear_caches()


def unequal_tensor_shards():
    """Two column shards, one dense and one 95% sparse: the sparse shard's
    values carry ~15k zeros of padding (60 ring chunks) past its last tile."""
    rng = np.random.default_rng(7)
    dense = rand((128, 256), seed=7)
    dense[:, 128:] *= rng.random((128, 128)) < 0.05
    return dense, split_sparse(SparseWeight.from_dense(dense.astype(jnp.bfloat16)), 2, "out")


def test_offsets_table_ends_at_the_last_nonzero_not_the_padding():
    dense, shards = unequal_tensor_shards()
    sparse_shard = jax.tree.map(lambda a: a[1], shards.stacked)
    table = np.asarray(sm.offsets_table(sparse_shard))
    assert table.shape == (sparse_shard.bitmap.shape[0] * sparse_shard.bitmap.shape[1] + 1, 4)
    true_nnz = int(np.count_nonzero(dense[:, 128:].astype(jnp.bfloat16)))
    assert sparse_shard.values.shape[0] - true_nnz > 60 * sm.CHUNK
    assert (table[-1] == true_nnz).all()


def test_kernel_on_a_padded_tensor_parallel_shard():
    dense, shards = unequal_tensor_shards()
    x = jnp.asarray(rand((4, 128), seed=8), jnp.bfloat16)
    expected = np.asarray(x, np.float32) @ dense.astype(jnp.bfloat16).astype(np.float32)
    for i, cols in enumerate((slice(0, 128), slice(128, 256))):
        shard = jax.tree.map(lambda a, i=i: a[i], shards.stacked)
        got = interpret_matmul(x, shard)[:, :128]
        np.testing.assert_allclose(got, expected[:, cols], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("split", ["out", "in"])
def test_tensor_parallel_sparse_layers_with_the_kernel_lower_for_cuda(split):
    """Column / row-parallel sparse linears run the kernel on each device's shard
    inside shard_map (values gathered over fsdp); forward and gradients (x and
    values) lower for fsdp=2 x tensor=2 H100s."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallax import sharding as ps

    mesh = testing.h100_abstract_mesh({"data": 1, "fsdp": 2, "sequence": 1, "tensor": 2})
    w = sparsify(rand((512, 768)), 0.7)
    w = w.with_values(w.values.astype(jnp.bfloat16))
    shards = split_sparse(w, 2, split, values_multiple=2)  # values over fsdp too
    abstract_shards = jax.tree.map(
        lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
        shards,
        ps.sparse_specs(shards, 2),
    )
    x_spec = P() if split == "out" else P(None, None, "tensor")
    x = jax.ShapeDtypeStruct((2, 8, 512), jnp.bfloat16, sharding=NamedSharding(mesh, x_spec))
    layer = ps.column_parallel if split == "out" else ps.row_parallel

    def loss(x, values, shards):
        shards = dataclasses.replace(shards, stacked=shards.stacked.with_values(values))
        y = layer(x, shards, mesh=mesh, implementation="mosaic")
        return y.astype(jnp.float32).sum()

    grad = jax.value_and_grad(loss, argnums=(0, 1))  # value: keep the forward kernel
    values = abstract_shards.stacked.values
    exported = testing.lower_for_cuda(grad, x, values, abstract_shards, mesh=mesh)
    assert "mosaic_gpu" in exported.mlir_module()
