"""Bitmap-tile sparse weights against scipy.sparse and dense masked products."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from pallax.pallas_kernels import SparseWeight, activation_norms, sparse_matmul, sparsify


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("k, n", [(300, 130), (64, 64), (1, 7), (200, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_matmul_matches_scipy(k, n, sparsity):
    w = sparsify(rand((k, n)), sparsity)
    csr = scipy.sparse.csr_matrix(np.asarray(w.todense()))
    x = rand((5, k), seed=1)
    expected = (csr.T @ x.T).T  # scipy computes the sparse product
    np.testing.assert_allclose(
        np.asarray(sparse_matmul(jnp.asarray(x), w)), expected, rtol=2e-5, atol=2e-5
    )
    assert abs(w.sparsity - (1 - csr.nnz / (k * n))) < 1e-12


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_round_trip_is_exact_with_empty_tiles_and_rows(dtype):
    w = rand((256, 192)).astype(dtype)
    w[:, 10] = 0  # an empty output row
    w[64:128, 64:128] = 0  # an empty tile
    w[0:64, 128:] *= np.random.default_rng(2).random((64, 64)) < 0.97  # a nearly full tile
    w[(np.abs(w.astype(np.float32)) < 0.5)] = 0
    packed = SparseWeight.from_dense(w).validate()
    np.testing.assert_array_equal(np.asarray(packed.todense()), w)
    np.testing.assert_array_equal(np.asarray(packed.mask()), w != 0)
    assert packed.values.dtype == dtype


def test_nbytes_is_two_bytes_per_nonzero_plus_a_bit():
    w = sparsify(rand((4096, 1024)).astype(jnp.bfloat16), 0.8)
    expected = 2 * w.nnz + 4096 * 1024 // 8 + 16 * (4096 // 64) * (1024 // 64)
    assert w.nbytes == expected
    assert 2 * 4096 * 1024 / w.nbytes > 3.5  # the bitmap bound at 80% is 3.81x


def test_pruning_methods():
    w = rand((64, 32))
    norms = np.linspace(0.1, 10.0, 64).astype(np.float32)
    magnitude = np.asarray(sparsify(w, 0.75).mask())
    wanda = np.asarray(sparsify(w, 0.75, "wanda", activation_norms=norms).mask())
    assert (magnitude.sum(axis=0) == 16).all() and (wanda.sum(axis=0) == 16).all()
    # Wanda keeps inputs with large activations more often than magnitude does.
    assert wanda[32:].sum() > magnitude[32:].sum()
    score = np.abs(w) * norms[:, None]
    for col in range(32):
        kept = score[wanda[:, col], col]
        assert kept.min() >= score[~wanda[:, col], col].max()
    two_four = np.asarray(sparsify(w, pattern="2:4").mask())
    assert (two_four.reshape(16, 4, 32).sum(axis=1) == 2).all()
    x = rand((10, 64))
    np.testing.assert_allclose(
        np.asarray(activation_norms(x)), np.linalg.norm(x, axis=0), rtol=1e-5
    )


def test_gradients_match_dense_masked_product():
    w = sparsify(rand((128, 96)), 0.7)
    mask = np.asarray(w.mask())
    x = jnp.asarray(rand((4, 7, 128), seed=3))
    dy = jnp.asarray(rand((4, 7, 96), seed=4))

    def loss_sparse(x, values):
        return jnp.sum(sparse_matmul(x, w.with_values(values)) * dy)

    def loss_dense(x, dense):
        return jnp.sum((x @ (dense * mask)) * dy)

    dx, dvalues = jax.jit(jax.grad(loss_sparse, argnums=(0, 1)))(x, w.values)
    dx_ref, ddense = jax.grad(loss_dense, argnums=(0, 1))(x, w.todense())
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-4, atol=1e-4)
    # d loss / d values is the SDDMM (x^T dy) sampled at the mask, in storage order.
    ddense_values = SparseWeight.from_dense(np.where(mask, np.asarray(ddense), 0.0))
    assert ddense_values.nnz <= w.nnz
    regathered = np.asarray(w.with_values(jnp.asarray(dvalues)).todense())
    np.testing.assert_allclose(
        regathered, np.where(mask, np.asarray(ddense), 0), rtol=1e-4, atol=1e-4
    )


def test_training_keeps_the_mask():
    w = sparsify(rand((64, 32)), 0.8)
    x = jnp.asarray(rand((16, 64), seed=5))
    target = jnp.asarray(rand((16, 32), seed=6))
    values = w.values
    for _ in range(5):
        grads = jax.grad(lambda v: jnp.mean((sparse_matmul(x, w.with_values(v)) - target) ** 2))(
            values
        )
        values = values - 0.1 * grads
    trained = w.with_values(values)
    assert np.array_equal(np.asarray(trained.mask()), np.asarray(w.mask()))
    assert not np.allclose(np.asarray(values), np.asarray(w.values))


def test_corrupt_formats_and_bad_inputs_raise():
    w = sparsify(rand((128, 64)), 0.5)
    with pytest.raises(ValueError, match="values has"):
        dataclasses.replace(w, values=w.values[:-1]).validate()
    with pytest.raises(ValueError, match="tile_offsets do not match"):
        dataclasses.replace(w, tile_offsets=w.tile_offsets + 1).validate()
    with pytest.raises(ValueError, match="tile_offsets must be int32"):
        dataclasses.replace(w, tile_offsets=w.tile_offsets[:, :1]).validate()
    narrow = sparsify(rand((128, 50)), 0.5)  # 50 outputs padded to 64 rows
    flipped = np.asarray(narrow.bitmap).copy()
    flipped[0, 0, 2 * 60] |= 1  # row 60 (padding), input 0
    with pytest.raises(ValueError, match="bits set in the padding"):
        dataclasses.replace(narrow, bitmap=jnp.asarray(flipped)).validate()
    with pytest.raises(ValueError, match=r"x \(2, 100\) does not match weight in_features 128"):
        sparse_matmul(jnp.ones((2, 100)), w)
    with pytest.raises(ValueError, match="sparsity must be in"):
        sparsify(rand((8, 8)), 1.0)
    with pytest.raises(ValueError, match="pattern must look like"):
        sparsify(rand((8, 8)), pattern="4:2")
    with pytest.raises(ValueError, match="not divisible by the 2:4 group"):
        sparsify(rand((6, 8)), pattern="2:4")
    with pytest.raises(ValueError, match="needs activation_norms"):
        sparsify(rand((8, 8)), method="wanda")
    with pytest.raises(ValueError, match="expected a SparseWeight"):
        sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 8)))
    with pytest.raises(ValueError, match=r"does not support x dtype float32"):
        sparse_matmul(jnp.ones((2, 128)), w, implementation="mosaic")
    with pytest.raises(ValueError, match="implementation must be"):
        sparse_matmul(jnp.ones((2, 128)), w, implementation="triton")


@pytest.mark.parametrize("split", ["in", "out"])
def test_split_and_merge_round_trip_keeping_zero_valued_nonzeros(split):
    from pallax.pallas_kernels import split_sparse

    w = sparsify(np.random.default_rng(3).standard_normal((200, 130)).astype(np.float32), 0.6)
    values = np.asarray(w.values).copy()
    values[::7] = 0.0  # trained to exactly zero: still part of the fixed mask
    w = w.with_values(jnp.asarray(values))
    shards = split_sparse(w, 3, split, values_multiple=4)
    assert shards.stacked.values.shape[1] % 4 == 0
    merged = shards.merge()
    np.testing.assert_array_equal(np.asarray(merged.mask()), np.asarray(w.mask()))
    np.testing.assert_array_equal(np.asarray(merged.values), np.asarray(w.values))
    np.testing.assert_array_equal(np.asarray(merged.bitmap), np.asarray(w.bitmap))
    with pytest.raises(ValueError, match=r"mask shape \(2, 2\) != weight shape \(3, 2\)"):
        SparseWeight.from_dense(np.ones((3, 2)), mask=np.ones((2, 2), bool))
