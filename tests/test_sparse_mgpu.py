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

RING = 16384  # a values ring size (a power of two) for the decode tests
# The kernel before issue 13, kept as a config for A/B runs on the GPU.
OLD = {"compute_warpgroups": 1, "value_chunk": 256, "ring_values": 8192}


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
@pytest.mark.parametrize("shift", [0, 1000, RING - 700])  # the last wraps the ring
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_decode_tile_matches_dense(shift, density, strategy):
    """The thread-level decode (jnp backend), fed a ring as the kernel sees it."""
    w = imbalanced_weight(192, 128, density)
    dense_t = np.asarray(w.todense(), np.float32).T
    for n_tile, k_tile in [(0, 0), (1, 1), (1, 2), (0, 2)]:
        start = int(w.tile_offsets[n_tile, k_tile, 0])
        values = np.asarray(w.values[start : start + 4096])
        ring = np.zeros(RING, values.dtype)
        ring[(np.arange(values.shape[0]) + start + shift) % RING] = values
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
    with pytest.raises(
        ValueError, match=r"block_m=256, max_concurrent_steps=4, ring_values=16384.*float32"
    ):
        sm.matmul(x, w, config=sm.SpmmConfig(block_m=256))


def test_bad_ring_configs_are_rejected():
    # 64 KiB of values by default: 32768 bf16 or 16384 fp32 values.
    assert sm.SpmmConfig().ring_values_for(2) == 32768
    assert sm.SpmmConfig().ring_values_for(4) == 16384
    with pytest.raises(ValueError, match="compute_warpgroups=3"):
        sm.SpmmConfig(compute_warpgroups=3)
    with pytest.raises(ValueError, match="value_chunk=512"):
        sm.SpmmConfig(value_chunk=512)
    with pytest.raises(ValueError, match="ring_values=12288 must be a power of two"):
        sm.SpmmConfig(ring_values=12288)
    # Two warpgroups may each hold a full tile's 17 chunks of 256.
    with pytest.raises(ValueError, match="holds 32 chunks of 256; compute_warpgroups=2 need 34"):
        sm.SpmmConfig(value_chunk=256, ring_values=8192)
    sm.SpmmConfig(value_chunk=256, ring_values=8192, compute_warpgroups=1)
    with pytest.raises(ValueError, match="split_k_reduction='atomic' must be one of"):
        sm.SpmmConfig(split_k_reduction="atomic")


@pytest.mark.parametrize(
    "density, expected", [(0.05, "bits"), (0.25, "bits"), (0.3, "dense"), (1.0, "dense")]
)
def test_decode_strategy_follows_density(density, expected):
    assert sm.SpmmConfig().decode_for(density) == expected
    assert sm.SpmmConfig(decode="dense").decode_for(density) == "dense"
    with pytest.raises(ValueError, match="decode='scatter'"):
        sm.SpmmConfig(decode="scatter")


@pytest.mark.parametrize("chunk", sm.VALUE_CHUNKS)
def test_chunk_ranges_cover_each_tile_once(chunk):
    """The memory warpgroup walks the values ring with _chunk_range: every
    tile's nonzeros lie in chunks that were fetched, each chunk fetched once,
    in order from the CTA's first chunk (the compute warpgroups count on it)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4097, size=40)
    counts[[3, 4, 10]] = 0  # empty tiles
    ends = np.cumsum(counts)
    starts = ends - counts
    g_hi, fetched = 0, []
    for start, end in zip(starts, ends, strict=True):
        n_new, g_hi = (int(v) for v in sm._chunk_range(start, end, g_hi, chunk))
        fetched += range(g_hi - n_new, g_hi)
        a, b = (int(v) for v in sm._tile_chunks(start, end, chunk))
        if end > start:
            assert set(range(start // chunk, -(-end // chunk))) == set(range(a, b))
            assert set(range(a, b)) <= set(fetched)
        assert n_new <= 4096 // chunk + 1
    assert fetched == list(range(fetched[0], fetched[0] + len(fetched)))


def interpret_matmul(x, w, **config):
    with testing.gpu_interpret():
        return np.asarray(sm.matmul(x, w, config=sm.SpmmConfig(**config)))


def padded_values(w, multiple):
    """Zeros after the last nonzero up to a multiple of ``multiple`` values (as
    tensor-parallel shards carry): 8 bf16 makes the chunk copies one bulk copy."""
    pad = -w.values.shape[0] % multiple or multiple
    return dataclasses.replace(w, values=jnp.pad(w.values, (0, pad)))


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
        # Values padded to 16 bytes: 2 KB chunks as one bulk copy each (the
        # others: four 256-value boxes per chunk barrier).
        (300, 130, 5, 0.3, {"pad_values": 8}),
        (320, 64, 3, 0.9, {"pad_values": 8, "ring_values": 16384}),  # wraps
        # One decoding warpgroup (odd tile counts leave warpgroup 1 one fewer).
        (320, 64, 3, 0.9, {"compute_warpgroups": 1, "ring_values": 16384}),
        (320, 64, 3, 0.9, {"value_chunk": 256, "ring_values": 16384}),  # 2 wgs, small chunks
        # Split-K: one tile per split, 3 token tiles, reduce-added by TMA into
        # one accumulator (the default) or written as partials summed by XLA.
        (192, 128, 24, 0.5, {"block_m": 8, "k_splits": 3, "split_k_reduction": "tma_add"}),
        (192, 128, 24, 0.5, {"block_m": 8, "k_splits": 3, "split_k_reduction": "partials"}),
        # The kernel before issue 13: 256-value chunks, one decoding warpgroup.
        (300, 130, 5, 0.3, OLD),
        (320, 64, 3, 0.9, OLD),  # the ring wraps
    ],
)
def test_kernel_matches_scipy_in_interpret_mode(k, n, m, density, config):
    config = dict(config)
    pad = config.pop("pad_values", None)
    w = imbalanced_weight(k, n, density)
    if pad:
        w = padded_values(w, pad)
        assert w.values.shape[0] * 2 % 16 == 0
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


@pytest.mark.parametrize("config", [{}, OLD], ids=["default", "old"])
def test_no_races_and_zero_sparsity(config):
    """Every tile full (4096 nonzeros: 4 chunks of 1024, 16 of 256), one tile
    per decoding warpgroup."""
    w = SparseWeight.from_dense(rand((128, 64)).astype(jnp.bfloat16))
    x = jnp.asarray(rand((4, 128), seed=1), jnp.bfloat16)
    with testing.gpu_interpret(detect_races=True):
        got = np.asarray(sm.matmul(x, w, config=sm.SpmmConfig(**config)))
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


@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("density", [0.3, 0.1])
@pytest.mark.parametrize(
    "structure, m",
    [("bulk", 1), ("bulk", 16), ("bulk", 64), ("bulk", 256), ("old", 1), ("old", 256)],
)
def test_both_structures_lower_at_llama_shapes(m, k, n, density, structure):
    """The test above lowers the default with 4-box chunks (its nnz are not a
    multiple of 8); here the default with one bulk copy per 2 KB chunk, and the
    kernel before issue 13 (the A/B config), at the dispatch's Llama shapes."""
    nnz = int(density * k * n) // 8 * 8  # 16-byte multiple: bulk copies
    config = sm.SpmmConfig(**OLD) if structure == "old" else None
    w = SparseWeight(
        values=jax.ShapeDtypeStruct((nnz,), jnp.bfloat16),
        bitmap=jax.ShapeDtypeStruct((n // 64, k // 64, 128), jnp.uint32),
        tile_offsets=jax.ShapeDtypeStruct((n // 64, k // 64, 4), jnp.int32),
        in_features=k,
        out_features=n,
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    run = functools.partial(sparse_matmul, implementation="mosaic", config=config)
    assert "mosaic_gpu" in testing.lower_for_cuda(run, x, w).mlir_module()


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
    values carry ~15k zeros of padding (15 ring chunks of 1024) past its last tile."""
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
    assert sparse_shard.values.shape[0] - true_nnz > 15 * 1024  # 15 chunks of 1024
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


def test_decode_instruction_counts_quoted_in_results():
    """The per-thread counts benchmarks/RESULTS.md (spmm) derives its
    predictions from, counted by running decode_thread on a counting backend."""
    dense = sm.decode_op_counts("dense")
    assert dense == {"alu": 308, "xu": 32, "shfl": 5, "lds": 33, "sts": 4}
    one, two = sm.decode_op_counts("bits", 1), sm.decode_op_counts("bits", 2)
    assert one == {"alu": 156, "xu": 18, "shfl": 5, "lds": 9, "sts": 12}
    # Each group of set bits: 8 loads, 8 predicated stores, 16 XU (ctz) ops.
    assert {k: two[k] - one[k] for k in one} == {
        "alu": 100,
        "xu": 16,
        "shfl": 0,
        "lds": 8,
        "sts": 8,
    }
