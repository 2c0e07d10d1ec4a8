"""W8A8 matmul for prefill-sized M on Hopper (Pallas Mosaic GPU): 128-row tiles, two compute wgs.

``y [M, N] = s_x * (q_x [M, K] @ W)`` with ``q_x`` int8 (per-token scales
``s_x``) and ``W`` a symmetric 8-bit :class:`QuantizedWeight` stored ``[N, K]``.
Each CTA owns a ``128 x block_n`` output tile: two compute warpgroups take
64 rows each and share the weight tile, and a memory warpgroup streams the
int8 x and weight tiles (and per-block weight scales) through a TMA ring.
int8 x int8 wgmma runs straight from shared memory into int32 accumulators.

* Per-channel weight scales (``group_size=None``: one group spans K), as
  SmoothQuant, QServe and cuBLASLt int8 do: one int32 accumulator over the
  CTA's whole K range, wgmma asynchronous with one group in flight, converted
  and scaled once per output tile.
* Group-wise scales: a fresh int32 accumulator per 128-wide K block (a block
  never spans two groups). Its conversion avoids the quarter-rate int-to-float
  instruction: a block's sum is below ``127^2 x 128 < 2^22`` in magnitude, so
  ``bitcast(acc + 0x4B400000) - 1.5 x 2^23`` is ``float(acc)`` exactly (one
  integer add, one float add), then one FMA into the fp32 sum. While one
  warpgroup converts, the other's wgmma runs on the tensor cores.

The per-token activation scales are applied in the epilogue; without split-K
the kernel writes the activation dtype directly (no fp32 ``[M, N]`` round
trip). Split-K (``Int8Config.split_k_reduction``): by default each CTA
reduce-adds its scaled fp32 tile into one fp32 ``[Mp, Np]`` accumulator by TMA
("tma_add"), or writes fp32 partials ``[splits, Mp, Np]`` summed in XLA
("partials", bitwise reproducible).

Budget per CTA (predicted): shared memory ``slots x (128 x 128 + block_n x 128
+ 4 block_n) + 2 x 64 x block_n x 4`` bytes (~194 KiB at block_n=128, 4
slots); registers per compute thread: ``block_n / 2`` fp32 + ``block_n / 2``
int32 accumulator values (128 at block_n=128) plus addressing, under the 232
given to compute warpgroups.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallax.pallas_kernels import _mgpu
from pallax.pallas_kernels._mgpu import Stream, cdiv

WG_ROWS = 64  # token rows per compute warpgroup
NUM_COMPUTE_WGS = 2
BLOCK_M = WG_ROWS * NUM_COMPUTE_WGS
BLOCK_K = 128  # == quantization.PACK_BLOCK
SMEM_BYTES = 227 * 1024
MAGIC_INT = 0x4B400000  # fp32 1.5 * 2^23: its low 22 mantissa bits hold a small int
MAGIC_FLOAT = 12582912.0


@dataclasses.dataclass(frozen=True)
class Int8Config:
    block_n: int = 128
    max_concurrent_steps: int = 4
    k_splits: int | None = None  # None: aim for ``target_ctas`` CTAs.
    target_ctas: int = 132
    split_k_reduction: str | None = None  # see _mgpu.SPLIT_K_REDUCTIONS

    def __post_init__(self):
        _mgpu.check_split_k_reduction(self.split_k_reduction)
        if self.block_n not in (64, 128, 256):
            raise ValueError(f"block_n={self.block_n} must be 64, 128 or 256")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"k_splits={self.k_splits} must be >= 1")

    def splits_for(self, output_tiles: int, k_blocks: int) -> int:
        if self.k_splits is not None:
            return max(1, min(self.k_splits, k_blocks))
        return max(1, min(cdiv(self.target_ctas, output_tiles), k_blocks // 4 or 1))


def small_int32_to_float(acc):
    """``float(acc)`` for int32 ``|acc| < 2^22`` with an integer add and a float add."""
    return lax.bitcast_convert_type(acc + MAGIC_INT, jnp.float32) - MAGIC_FLOAT


def _kernel(
    x_ref,
    w_ref,
    scale_ref,
    x_scale_ref,
    o_ref,
    x_smem,
    w_smem,
    scale_smem,
    x_scale_smem,
    col_scale_smem,
    o_smem,
    epilogue_barrier,
    loaded,
    consumed,
    *,
    reduce: bool,
    per_channel: bool,
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
    cols = pl.ds(n_tile * block_n, block_n)
    acc_shape = (WG_ROWS, block_n)
    per_col = plgpu.Layout.WGMMA.reduce(0)  # a [block_n] vector along output columns
    per_row = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector along the wg's rows

    def scaled_by_cols(acc, col_scale):
        return acc * lax.broadcast_in_dim(col_scale, acc_shape, [1])

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        loaded_x, loaded_w, *loaded_s = loaded
        consumed_x, consumed_w, *consumed_s = consumed
        my_rows = pl.ds(wg * WG_ROWS, WG_ROWS)

        def release(slot):
            for barrier in (consumed_x, consumed_w, *consumed_s):
                plgpu.barrier_arrive(barrier.at[slot])

        def whole_k(acc_ref):
            def step(k_step, _):
                slot = _mgpu.slot_of(k_step, lo, num_slots)
                plgpu.barrier_wait(loaded_x.at[slot])
                plgpu.barrier_wait(loaded_w.at[slot])
                plgpu.wgmma(acc_ref, x_smem.at[slot, my_rows], w_smem.at[slot].T)
                plgpu.wgmma_wait(1)  # Step k-1's wgmma is done: release its slot.

                @pl.when(k_step > lo)
                def _():
                    release(_mgpu.slot_of(k_step - 1, lo, num_slots))

            lax.fori_loop(lo, hi, step, None)
            plgpu.wgmma_wait(0)
            release(_mgpu.slot_of(hi - 1, lo, num_slots))
            return acc_ref[...]

        def group_wise(k_step, acc):
            slot = _mgpu.slot_of(k_step, lo, num_slots)
            for barrier in (loaded_x, loaded_w, *loaded_s):
                plgpu.barrier_wait(barrier.at[slot])

            def int_mma(int_acc):
                plgpu.wgmma(int_acc, x_smem.at[slot, my_rows], w_smem.at[slot].T)
                return int_acc[...]

            block = pl.run_scoped(int_mma, plgpu.ACC(acc_shape, jnp.int32))
            scale = plgpu.load(scale_smem.at[slot], layout=per_col)
            release(slot)
            return acc + scaled_by_cols(small_int32_to_float(block), scale)

        if per_channel:
            acc = pl.run_scoped(whole_k, plgpu.ACC(acc_shape, jnp.int32)).astype(jnp.float32)
        else:
            acc = lax.fori_loop(lo, hi, group_wise, _mgpu.zeros(acc_shape))
        # Epilogue: per-token (and per-channel weight) scales, read once.
        rows = pl.ds(m_tile * BLOCK_M + wg * WG_ROWS, WG_ROWS)
        plgpu.copy_gmem_to_smem(x_scale_ref.at[rows], x_scale_smem.at[wg], epilogue_barrier.at[wg])
        if per_channel:
            col_barrier = epilogue_barrier.at[NUM_COMPUTE_WGS + wg]
            plgpu.copy_gmem_to_smem(scale_ref.at[0, cols], col_scale_smem.at[wg], col_barrier)
            plgpu.barrier_wait(col_barrier)
        plgpu.barrier_wait(epilogue_barrier.at[wg])
        x_scale = plgpu.load(x_scale_smem.at[wg], layout=per_row)
        acc = acc * lax.broadcast_in_dim(x_scale, acc_shape, [0])
        if per_channel:
            acc = scaled_by_cols(acc, plgpu.load(col_scale_smem.at[wg], layout=per_col))
        o_smem.at[wg][...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        _mgpu.store_output_tile(o_smem.at[wg], o_ref, split, (rows, cols), reduce)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        rows = pl.ds(m_tile * BLOCK_M, BLOCK_M)
        k_block = lambda step: pl.ds(step * BLOCK_K, BLOCK_K)  # noqa: E731
        streams = [
            Stream(lambda s: x_ref.at[rows, k_block(s)], x_smem, loaded[0], consumed[0]),
            Stream(lambda s: w_ref.at[cols, k_block(s)], w_smem, loaded[1], consumed[1]),
        ]
        if not per_channel:
            streams.append(
                Stream(lambda s: scale_ref.at[s, cols], scale_smem, loaded[2], consumed[2])
            )
        _mgpu.produce(streams, lo, hi, num_slots)


def matmul(x, qw, *, x_scale, out_dtype=jnp.float32, config: Int8Config | None = None):
    """int8 x ``[M, Kp]`` with ``x_scale [M]`` @ symmetric 8-bit ``qw`` -> ``[M, Np]``.

    The result is ``out_dtype`` (rounded once, in the kernel, when there is no
    split-K; otherwise the splits are summed in fp32 first).
    """
    from pallax.pallas_kernels import quantized_matmul_swap_mgpu as swap

    config = config or Int8Config()
    reduction = _mgpu.split_k_reduction_for(config.split_k_reduction)
    m, kp = x.shape
    np_ = qw.values.shape[0]
    if x.dtype != jnp.int8 or qw.bits != 8 or qw.zeros is not None:
        raise ValueError(
            f"the int8 kernel takes int8 x and a symmetric 8-bit weight, got x {x.dtype}, "
            f"bits={qw.bits}, symmetric={qw.zeros is None}"
        )
    block_n = min(config.block_n, np_)
    if np_ % block_n:
        raise ValueError(f"out_features padded to {np_} is not a multiple of block_n={block_n}")
    mp = -(-m // BLOCK_M) * BLOCK_M
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    x_scale = jnp.pad(x_scale.astype(jnp.float32), (0, mp - m))
    k_blocks = kp // BLOCK_K
    per_channel = qw.scales.shape[1] == 1
    if per_channel:
        scales = qw.scales.T.astype(jnp.float32)  # [1, Np], read once per CTA
    else:
        scales = swap.per_block(qw.scales, qw.group_size, k_blocks)
    output_tiles = (np_ // block_n) * (mp // BLOCK_M)
    splits = config.splits_for(output_tiles, k_blocks)
    blocks_per_split = cdiv(k_blocks, splits)
    splits = cdiv(k_blocks, blocks_per_split)
    num_slots = config.max_concurrent_steps
    o_dtype = jnp.dtype(out_dtype) if splits == 1 else jnp.dtype(jnp.float32)
    int8_tile = lambda rows: plgpu.SMEM(  # noqa: E731
        (num_slots, rows, BLOCK_K), jnp.int8, transforms=_mgpu.smem_transforms(jnp.int8)
    )
    buffers = (
        int8_tile(BLOCK_M),
        int8_tile(block_n),
        plgpu.SMEM((num_slots, block_n), jnp.float32),
        plgpu.SMEM((NUM_COMPUTE_WGS, WG_ROWS), jnp.float32),
        plgpu.SMEM((NUM_COMPUTE_WGS, block_n), jnp.float32),
        plgpu.SMEM((NUM_COMPUTE_WGS, WG_ROWS, block_n), o_dtype),
    )
    smem = sum(math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in buffers)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"Int8Config(block_n={block_n}, max_concurrent_steps={num_slots}) needs "
            f"~{smem // 1024} KiB of shared memory, more than the {SMEM_BYTES // 1024} KiB "
            "of an H100: lower block_n or max_concurrent_steps"
        )
    kernel = functools.partial(
        _kernel,
        reduce=splits > 1 and reduction == "tma_add",
        per_channel=per_channel,
        blocks_per_split=blocks_per_split,
        k_blocks=k_blocks,
        block_n=block_n,
        num_slots=num_slots,
    )
    kernel_with = lambda out_type: plgpu.kernel(  # noqa: E731
        kernel,
        out_type=out_type,
        scratch_types=(
            *buffers,
            plgpu.Barrier(num_barriers=2 * NUM_COMPUTE_WGS),  # x scales, column scales
            *_mgpu.ring_barriers(num_slots, 3 - per_channel, NUM_COMPUTE_WGS),
        ),
        grid=(np_ // block_n, splits, mp // BLOCK_M),
        grid_names=("n_tiles", "k_splits", "m_tiles"),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    out = _mgpu.split_k_output(
        kernel_with,
        (x, qw.values, scales, x_scale),
        splits=splits,
        shape=(mp, np_),
        reduction=reduction,
        dtype=o_dtype,
    )
    return out[:m].astype(out_dtype)
