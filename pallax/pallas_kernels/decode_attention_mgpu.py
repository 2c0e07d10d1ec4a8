"""Decode attention over a KV cache for Hopper (Pallas Mosaic GPU), split-K.

A few new query tokens per sequence attend to a KV cache with per-sequence
lengths. Decode is memory bound, so the cache is split along its length over
many CTAs (flash-decoding); each CTA writes a partial output and its
log-sum-exp, and a tiny XLA epilogue merges the splits.

GQA: the ``group`` query heads sharing a kv head and the ``num_new`` query
tokens are packed as the rows of one wgmma tile (row ``r = t * group + g``), so
each kv block is read once per kv head.

Cache positions: with ``rolling=False`` slot ``s`` holds position ``s``. With
``rolling=True`` the cache is a ring of ``cache_len`` slots (sliding-window
layers) and slot ``s`` holds the latest position ``p <= length - 1`` with
``p % cache_len == s``. New token ``t`` sits at position
``length - num_new + t`` and sees positions ``[pos - left, pos]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallax.pallas_kernels import _mgpu
from pallax.pallas_kernels._mgpu import cdiv, floordiv, mma, mma_from_registers

ROWS = 64  # wgmma M: packed (token, head-in-group) rows per tile.


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_kv: int = 128
    num_splits: int | None = None  # None: enough CTAs to fill ~2 waves of SMs.
    max_concurrent_steps: int = 2
    target_ctas: int = 264

    def __post_init__(self):
        if self.block_kv <= 0 or self.block_kv % 64:
            raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1")

    @staticmethod
    def for_head_dim(head_dim: int) -> DecodeConfig:
        """~128 KB of K/V in flight per CTA: deep rings keep HBM busy while decoding."""
        if head_dim <= 64:
            return DecodeConfig(block_kv=128, max_concurrent_steps=4)
        if head_dim <= 128:
            return DecodeConfig(block_kv=64, max_concurrent_steps=4)
        return DecodeConfig(block_kv=64, max_concurrent_steps=2)

    def splits_for(self, ctas_without_split: int, num_blocks: int) -> int:
        if self.num_splits is not None:
            return max(1, min(self.num_splits, num_blocks))
        return max(1, min(cdiv(self.target_ctas, ctas_without_split), num_blocks))


@dataclasses.dataclass(frozen=True)
class DecodeGeometry:
    left: int  # Window to the left; >= cache_len means unbounded.
    num_new: int
    group: int
    cache_len: int  # Unpadded number of slots.
    rolling: bool

    def positions(self, slots, length):
        """Position held by each slot (negative: slot empty)."""
        if not self.rolling:
            return jnp.where(slots < length, slots, -1)
        wraps = lax.div(jnp.maximum(length - 1 - slots, 0), jnp.int32(self.cache_len))
        return jnp.where(
            slots < jnp.minimum(length, self.cache_len), slots + self.cache_len * wraps, -1
        )

    def slot_range(self, length):
        """Slots ``[lo, hi)`` that may hold visible positions."""
        if self.rolling:
            return jnp.int32(0), jnp.minimum(length, self.cache_len)
        lo = jnp.maximum(length - self.num_new - self.left, 0)
        return lo, jnp.maximum(length, lo)


def _decode_kernel(
    lengths_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    q_smem,
    k_smem,
    v_smem,
    p_smem,
    lse_smem,
    q_barrier,
    loaded,
    consumed,
    *,
    geometry: DecodeGeometry,
    config: DecodeConfig,
    scale: float,
    blocks_per_split: int,
    logits_soft_cap: float | None,
):
    block_kv = config.block_kv
    num_slots = config.max_concurrent_steps
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("kv_heads")
    split = lax.axis_index("splits")
    row_tile = lax.axis_index("row_tiles")
    wg = lax.axis_index("wg")
    length = lengths_ref[batch]
    slot_lo, slot_hi = geometry.slot_range(length)
    first = split * blocks_per_split
    lo = jnp.maximum(floordiv(slot_lo, block_kv), first)
    hi = jnp.minimum(cdiv(slot_hi, block_kv), first + blocks_per_split)
    hi = jnp.maximum(hi, lo)
    rows = pl.ds(row_tile * ROWS, ROWS)
    k_loaded, v_loaded = loaded
    k_consumed, v_consumed = consumed
    head_dim = q_ref.shape[-1]

    @pl.when(wg == 0)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head, rows], q_smem, q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[0])
        row_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=plgpu.Layout.WGMMA)
        col_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
        token = lax.div(row_ids + row_tile * ROWS, jnp.int32(geometry.group))
        query_pos = length - geometry.num_new + token

        def step(kv_step, carry):
            acc, m_i, l_i = carry
            slot = _mgpu.slot_of(kv_step, lo, num_slots)
            plgpu.barrier_wait(k_loaded.at[slot])
            s = mma(q_smem, k_smem.at[slot].T, (ROWS, block_kv))
            s, _ = _mgpu.base2_logits(s, scale, logits_soft_cap)
            plgpu.barrier_arrive(k_consumed.at[slot])
            key_pos = geometry.positions(col_ids + kv_step * block_kv, length)
            visible = (
                (key_pos >= 0) & (key_pos <= query_pos) & (key_pos >= query_pos - geometry.left)
            )
            s = jnp.where(visible, s, -jnp.inf)
            p, m_new, l_i, acc = _mgpu.softmax_step(s, m_i, l_i, acc)
            plgpu.barrier_wait(v_loaded.at[slot])
            acc = acc + mma_from_registers(p, p_smem, v_smem.at[slot], (ROWS, head_dim))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l_i

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        carry = (
            _mgpu.zeros((ROWS, head_dim)),
            _mgpu.zeros((ROWS,), row_layout, -jnp.inf),
            _mgpu.zeros((ROWS,), row_layout),
        )
        acc, m_i, l_i = lax.fori_loop(lo, hi, step, carry)
        # Empty splits get lse = -inf, i.e. zero weight in the merge.
        out, lse = _mgpu.softmax_finish(acc, m_i, l_i, empty_lse=-jnp.inf)
        q_smem[...] = out.astype(q_smem.dtype)
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, kv_head, split, rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, kv_head, split, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
        _mgpu.produce_kv(
            k_ref,
            v_ref,
            k_smem,
            v_smem,
            loaded,
            consumed,
            batch=batch,
            kv_head=kv_head,
            block_kv=block_kv,
            lo=lo,
            hi=hi,
            num_slots=num_slots,
        )


def decode(q_packed, k_cache, v_cache, lengths, *, geometry, scale, config, logits_soft_cap=None):
    """q_packed ``[B, K, R_pad, D]`` (R_pad % 64 == 0), caches ``[B, S_pad, K, D]``.

    ``logits_soft_cap``: logits are ``cap * tanh(scale * q.k / cap)`` (Gemma 2).

    Returns base-2 partial results per split: out ``[B, K, splits, R_pad, D]``
    and lse ``[B, K, splits, R_pad]``.
    """
    batch, num_kv_heads, rows_pad, head_dim = q_packed.shape
    cache_pad = k_cache.shape[1]
    assert rows_pad % ROWS == 0 and cache_pad % config.block_kv == 0
    dtype = q_packed.dtype
    num_blocks = cache_pad // config.block_kv
    row_tiles = rows_pad // ROWS
    splits = config.splits_for(batch * num_kv_heads * row_tiles, num_blocks)
    blocks_per_split = cdiv(num_blocks, splits)
    splits = cdiv(num_blocks, blocks_per_split)
    num_slots = config.max_concurrent_steps
    transforms = _mgpu.smem_transforms(dtype)
    kernel = functools.partial(
        _decode_kernel,
        geometry=geometry,
        config=config,
        scale=scale,
        blocks_per_split=blocks_per_split,
        logits_soft_cap=logits_soft_cap,
    )
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows_pad, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows_pad), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((ROWS, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((num_slots, config.block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((num_slots, config.block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((ROWS, config.block_kv), dtype, transforms=transforms),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            *_mgpu.ring_barriers(num_slots, 2, 1),
        ),
        grid=(num_kv_heads, splits, row_tiles, batch),
        grid_names=("kv_heads", "splits", "row_tiles", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, q_packed, k_cache, v_cache)


def merge_splits(out, lse):
    """Combine split-K partials ``[..., splits, R, D]`` / ``[..., splits, R]`` (base 2)."""
    m = jnp.max(lse, axis=-2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse - m)  # [..., splits, R]
    total = w.sum(axis=-2)
    merged = jnp.einsum("...sr,...srd->...rd", w, out.astype(jnp.float32))
    return merged / jnp.where(total == 0, 1.0, total)[..., None]
