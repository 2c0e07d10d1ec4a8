"""Benchmark weights built on the device in milliseconds (no host-side pruning).

``sparsify`` prunes on the host (an argpartition per output column, then
numpy packing): 1-7 s per Llama-sized matrix, far too slow for a GPU session
that builds dozens. :func:`random_sparse_weight` draws the same format on the
device under ``jit``: uniformly random positions with exactly the target count
per 16-row quarter tile (so ``nnz`` is static and the offsets are a
multiple of it) and normal values. A magnitude-pruned random matrix has a
uniformly random mask too; its per-quarter counts vary by about +-10% at 90%
sparsity, so these weights spread the decode work a little more evenly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallax.pallas_kernels import quantize
from pallax.pallas_kernels.sparse import QUARTER, TILE_K, TILE_ROWS, WORD_BITS, SparseWeight


def nonzeros_per_quarter(sparsity: float) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return max(1, round((1.0 - sparsity) * QUARTER))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def random_sparse_weight(
    key, in_features: int, out_features: int, sparsity: float, dtype=jnp.bfloat16
) -> SparseWeight:
    """A random ``[in_features, out_features]`` :class:`SparseWeight` (both
    multiples of 64) at ``sparsity``, drawn on the default device."""
    if in_features % TILE_K or out_features % TILE_ROWS or min(in_features, out_features) <= 0:
        raise ValueError(
            f"random_sparse_weight needs in/out features that are positive multiples of 64, "
            f"got [{in_features}, {out_features}]"
        )
    per_quarter = nonzeros_per_quarter(sparsity)
    n_tiles, k_tiles = out_features // TILE_ROWS, in_features // TILE_K
    mask_key, value_key = jax.random.split(key)
    scores = jax.random.bits(mask_key, (n_tiles, k_tiles, 4, QUARTER))
    # Rank of each score in its quarter: a random permutation, ties broken by
    # position (argsort is stable), so exactly ``per_quarter`` bits are set.
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    bits = (ranks < per_quarter).reshape(n_tiles, k_tiles, -1, WORD_BITS).astype(jnp.uint32)
    bitmap = jnp.sum(bits << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    quarters = n_tiles * k_tiles * 4
    offsets = (jnp.arange(quarters, dtype=jnp.int32) * per_quarter).reshape(n_tiles, k_tiles, 4)
    values = (jax.random.normal(value_key, (quarters * per_quarter,), jnp.float32) * 0.02).astype(
        dtype
    )
    return SparseWeight(
        values=values,
        bitmap=bitmap,
        tile_offsets=offsets,
        in_features=in_features,
        out_features=out_features,
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_quantized_weight(key, in_features: int, out_features: int, bits: int):
    """``quantize`` of a random normal ``[in, out]`` weight, on the device."""
    w = jax.random.normal(key, (in_features, out_features), jnp.float32) * 0.02
    return quantize(w, bits=bits)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_dense(key, rows: int, cols: int, dtype=jnp.bfloat16):
    return (jax.random.normal(key, (rows, cols), jnp.float32) * 0.02).astype(dtype)


def weight_copies(build, key, copies: int) -> list:
    """``copies`` independent weights from ``build(key_i)``."""
    return [build(k) for k in jax.random.split(key, copies)]
