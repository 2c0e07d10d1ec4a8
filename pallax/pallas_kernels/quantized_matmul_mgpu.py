"""Quantized matmul for Hopper (Pallas Mosaic GPU): W8A16, W4A16 and W8A8.

``y [M, N] = x [M, K] @ W`` with ``W`` a :class:`QuantizedWeight` stored
``[N, K]`` (K-major). Each CTA owns a ``64 x block_n`` output tile and a range
of K blocks (split-K, so that decode-sized M still fills the GPU); a memory
warpgroup streams x, weight and per-block scale tiles through a TMA ring.

* Weight-only: the compute warpgroup loads the int8 / packed int4 tile into
  registers, dequantizes ``(raw - zero) * scale``, stages it in shared memory
  as bf16/fp16 and runs wgmma with it as the transposed B operand.
* W8A8: int8 x int8 wgmma straight from shared memory into an int32
  accumulator per K block (one block never spans two scale groups), scaled by
  the weight scales and accumulated in fp32; the per-token activation scales
  are applied once at the end.

K splits are reduced as ``QuantMatmulConfig.split_k_reduction`` says: by
default reduce-added by TMA into one fp32 ``[M, N]`` accumulator, or fp32
partials ``[splits, M, N]`` summed in XLA (see ``_mgpu.SPLIT_K_REDUCTIONS``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallax.pallas_kernels import _mgpu
from pallax.pallas_kernels._mgpu import Stream, cdiv, mma
from pallax.pallas_kernels.quantized_matmul_int8_mgpu import Int8Config
from pallax.pallas_kernels.quantized_matmul_swap_mgpu import SwapConfig

BLOCK_M = 64
BLOCK_K = 128  # == quantization.PACK_BLOCK


VARIANTS = ("legacy", "swap", "int8")


@dataclasses.dataclass(frozen=True)
class QuantMatmulConfig:
    """Which kernel and its tiles.

    ``variant``: "legacy" (this file: 64-token x ``block_n`` output tiles, the
    weight as the wgmma B operand), "swap" (``quantized_matmul_swap_mgpu``:
    ``y^T = W^T x^T``, 64 weight rows x ``block_m`` tokens), "int8" (W8A8
    only, ``quantized_matmul_int8_mgpu``: 128 x ``block_n`` tiles, two compute
    warpgroups), or None: "swap" when M <= ``swap_max_tokens`` (decode: no
    token padding to 64, small split-K partials); above it "int8" for W8A8
    and "legacy" for weight-only. ``block_n`` applies to "legacy" and "int8",
    ``block_m`` to "swap"; the others to all. ``split_k_reduction``: how K
    splits are combined, "tma_add" (TMA reduce-add into one fp32 output: no
    partials in DRAM, last bits vary run to run), "partials" (fp32 per split,
    summed by XLA: bitwise reproducible), or None: "tma_add" where available.
    """

    block_n: int = 128
    max_concurrent_steps: int = 4
    k_splits: int | None = None  # None: aim for ``target_ctas`` CTAs.
    target_ctas: int = 264
    variant: str | None = None
    block_m: int | None = None  # "swap": tokens per CTA (None: M rounded up to 8, <= 64)
    swap_max_tokens: int = 64
    split_k_reduction: str | None = None

    def __post_init__(self):
        _mgpu.check_split_k_reduction(self.split_k_reduction)
        if self.block_n not in (64, 128, 256):
            raise ValueError(f"block_n={self.block_n} must be 64, 128 or 256")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"k_splits={self.k_splits} must be >= 1")
        if self.variant not in (None, *VARIANTS):
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS} or None")
        if self.swap_max_tokens < 0:
            raise ValueError(f"swap_max_tokens={self.swap_max_tokens} must be >= 0")
        self.swap_config()  # validates block_m

    def variant_for(self, m: int, w8a8: bool = False) -> str:
        if self.variant == "int8" and not w8a8:
            raise ValueError("variant='int8' is the W8A8 kernel; it needs act_bits=8")
        if self.variant:
            return self.variant
        if m <= self.swap_max_tokens:
            return "swap"
        return "int8" if w8a8 else "legacy"

    def int8_config(self) -> Int8Config:
        return Int8Config(
            block_n=self.block_n,
            max_concurrent_steps=self.max_concurrent_steps,
            k_splits=self.k_splits,
            split_k_reduction=self.split_k_reduction,
        )

    def swap_config(self) -> SwapConfig:
        return SwapConfig(
            block_m=self.block_m,
            max_concurrent_steps=self.max_concurrent_steps,
            k_splits=self.k_splits,
            target_ctas=self.target_ctas,
            split_k_reduction=self.split_k_reduction,
        )

    def splits_for(self, output_tiles: int, k_blocks: int) -> int:
        if self.k_splits is not None:
            return max(1, min(self.k_splits, k_blocks))
        # Keep at least 4 K blocks per split so the ring has something to overlap.
        return max(1, min(cdiv(self.target_ctas, output_tiles), k_blocks // 4 or 1))


def _kernel(
    x_ref,
    w_ref,
    scale_ref,
    zero_ref,
    x_scale_ref,
    o_ref,
    x_smem,
    w_smem,
    scale_smem,
    zero_smem,
    staging_smem,
    x_scale_smem,
    o_smem,
    x_scale_barrier,
    loaded,
    consumed,
    *,
    reduce: bool,
    bits: int,
    w8a8: bool,
    static_zero: float | None,
    blocks_per_split: int,
    k_blocks: int,
    block_n: int,
    num_slots: int,
):
    n_tile = lax.axis_index("n_tiles")
    split = lax.axis_index("k_splits")
    m_tile = lax.axis_index("m_tiles")
    wg = lax.axis_index("wg")
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, k_blocks)
    rows = pl.ds(m_tile * BLOCK_M, BLOCK_M)
    cols = pl.ds(n_tile * block_n, block_n)
    w_cols = BLOCK_K if bits == 8 else BLOCK_K // 2
    rows_of_w = plgpu.Layout.WGMMA.reduce(1)  # a [block_n] vector along W-tile rows
    cols_of_acc = plgpu.Layout.WGMMA.reduce(0)  # a [block_n] vector along output cols

    @pl.when(wg == 0)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        loaded_x, loaded_w, loaded_s, *loaded_z = loaded
        consumed_x, consumed_w, consumed_s, *consumed_z = consumed

        def dequantized(slot):
            raw = plgpu.load(w_smem.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.int32)
            scale = plgpu.load(scale_smem.at[slot], layout=rows_of_w)
            if static_zero is None:
                plgpu.barrier_wait(loaded_z[0].at[slot])
                zero = lax.broadcast_in_dim(
                    plgpu.load(zero_smem.at[slot], layout=rows_of_w), raw.shape, [0]
                )
                plgpu.barrier_arrive(consumed_z[0].at[slot])
            else:
                zero = static_zero
            scale = lax.broadcast_in_dim(scale, raw.shape, [0])
            dtype = staging_smem.dtype
            if bits == 8:
                return [((raw.astype(jnp.float32) - zero) * scale).astype(dtype)]
            low = ((raw & 15).astype(jnp.float32) - zero) * scale
            high = ((raw >> 4).astype(jnp.float32) - zero) * scale
            return [low.astype(dtype), high.astype(dtype)]

        def step(k_step, acc):
            slot = _mgpu.slot_of(k_step, lo, num_slots)
            plgpu.barrier_wait(loaded_x.at[slot])
            plgpu.barrier_wait(loaded_w.at[slot])
            plgpu.barrier_wait(loaded_s.at[slot])
            if w8a8:

                def int_mma(acc_ref):
                    plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot].T)
                    return acc_ref[...]

                block = pl.run_scoped(int_mma, plgpu.ACC((BLOCK_M, block_n), jnp.int32))
                scale = plgpu.load(scale_smem.at[slot], layout=cols_of_acc)
                block = block.astype(jnp.float32) * lax.broadcast_in_dim(scale, block.shape, [1])
            else:
                halves = dequantized(slot)
                width = BLOCK_K // len(halves)
                for i, half in enumerate(halves):
                    staging_smem.at[:, pl.ds(i * width, width)][...] = half
                plgpu.commit_smem()  # Staged weights must be visible to wgmma.
                block = mma(x_smem.at[slot], staging_smem.T, (BLOCK_M, block_n))
            for barrier in (consumed_x, consumed_w, consumed_s):
                plgpu.barrier_arrive(barrier.at[slot])
            return acc + block

        acc = lax.fori_loop(lo, hi, step, _mgpu.zeros((BLOCK_M, block_n)))
        if w8a8:
            plgpu.copy_gmem_to_smem(x_scale_ref.at[rows], x_scale_smem, x_scale_barrier.at[0])
            plgpu.barrier_wait(x_scale_barrier.at[0])
            x_scale = plgpu.load(x_scale_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            acc = acc * lax.broadcast_in_dim(x_scale, acc.shape, [0])
        o_smem[...] = acc
        plgpu.commit_smem()
        _mgpu.store_output_tile(o_smem, o_ref, split, (rows, cols), reduce)

    @pl.when(wg == 1)
    def _memory():
        k_block = lambda step: pl.ds(step * BLOCK_K, BLOCK_K)  # noqa: E731
        streams = [
            Stream(lambda s: x_ref.at[rows, k_block(s)], x_smem, loaded[0], consumed[0]),
            Stream(
                lambda s: w_ref.at[cols, pl.ds(s * w_cols, w_cols)], w_smem, loaded[1], consumed[1]
            ),
            Stream(lambda s: scale_ref.at[s, cols], scale_smem, loaded[2], consumed[2]),
        ]
        if static_zero is None:
            streams.append(
                Stream(lambda s: zero_ref.at[s, cols], zero_smem, loaded[3], consumed[3])
            )
        _mgpu.produce(streams, lo, hi, num_slots)


def per_block(per_group, group_size: int, k_blocks: int):
    """``[Np, Kp / group]`` -> ``[Kp / 128, Np]``: one row of scales per K block."""
    if group_size >= BLOCK_K:
        per_k_block = jnp.repeat(per_group, group_size // BLOCK_K, axis=1)
    else:
        raise ValueError(f"Mosaic quantized matmul needs group_size >= {BLOCK_K}, got {group_size}")
    return per_k_block[:, :k_blocks].T.astype(jnp.float32)


def matmul(x, qw, *, x_scale=None, config: QuantMatmulConfig | None = None):
    """x ``[M, Kp]`` (bf16/fp16, or int8 with ``x_scale [M]``: W8A8) -> f32 ``[M, Np]``."""
    config = config or QuantMatmulConfig()
    reduction = _mgpu.split_k_reduction_for(config.split_k_reduction)
    m, kp = x.shape
    np_ = qw.values.shape[0]
    block_n = min(config.block_n, np_)
    if np_ % block_n:
        raise ValueError(f"out_features padded to {np_} is not a multiple of block_n={block_n}")
    w8a8 = x_scale is not None
    mp = -(-m // BLOCK_M) * BLOCK_M
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    if w8a8:
        x_scale = jnp.pad(x_scale.astype(jnp.float32), (0, mp - m))
    else:
        x_scale = jnp.zeros((mp,), jnp.float32)  # Unused placeholder operand.
    k_blocks = kp // BLOCK_K
    scales = per_block(qw.scales, qw.group_size, k_blocks)
    zeros = per_block(qw.zeros, qw.group_size, k_blocks) if qw.zeros is not None else scales
    static_zero = None if qw.zeros is not None else (8.0 if qw.bits == 4 else 0.0)
    output_tiles = (np_ // block_n) * (mp // BLOCK_M)
    splits = config.splits_for(output_tiles, k_blocks)
    blocks_per_split = cdiv(k_blocks, splits)
    splits = cdiv(k_blocks, blocks_per_split)
    num_slots = config.max_concurrent_steps
    w_cols = BLOCK_K if qw.bits == 8 else BLOCK_K // 2
    num_streams = 3 if static_zero is not None else 4
    staging_dtype = jnp.bfloat16 if w8a8 else x.dtype
    vector = plgpu.SMEM((num_slots, block_n), jnp.float32)
    kernel = functools.partial(
        _kernel,
        reduce=splits > 1 and reduction == "tma_add",
        bits=qw.bits,
        w8a8=w8a8,
        static_zero=static_zero,
        blocks_per_split=blocks_per_split,
        k_blocks=k_blocks,
        block_n=block_n,
        num_slots=num_slots,
    )
    kernel_with = lambda out_type: plgpu.kernel(  # noqa: E731
        kernel,
        out_type=out_type,
        scratch_types=(
            plgpu.SMEM(
                (num_slots, BLOCK_M, BLOCK_K),
                x.dtype,
                transforms=_mgpu.smem_transforms(x.dtype, BLOCK_K),
            ),
            plgpu.SMEM(
                (num_slots, block_n, w_cols),
                qw.values.dtype,
                transforms=_mgpu.smem_transforms(qw.values.dtype, w_cols),
            ),
            vector,
            vector,
            plgpu.SMEM(
                (block_n, BLOCK_K),
                staging_dtype,
                transforms=_mgpu.smem_transforms(staging_dtype, BLOCK_K),
            ),
            plgpu.SMEM((BLOCK_M,), jnp.float32),
            plgpu.SMEM((BLOCK_M, block_n), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            *_mgpu.ring_barriers(num_slots, num_streams, 1),
        ),
        grid=(np_ // block_n, splits, mp // BLOCK_M),
        grid_names=("n_tiles", "k_splits", "m_tiles"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    inputs = (x, qw.values, scales, zeros, x_scale)
    out = _mgpu.split_k_output(
        kernel_with, inputs, splits=splits, shape=(mp, np_), reduction=reduction
    )
    return out[:m]
