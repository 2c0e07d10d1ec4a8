"""Quantized matmul for decode-sized M on Hopper (Pallas Mosaic GPU), operands swapped.

``y [M, N] = x [M, K] @ W`` with ``W`` a :class:`QuantizedWeight` stored
``[N, K]``, computed as ``y^T = W^T x^T`` (the structure of
``sparse_matmul_mgpu.py``, and Marlin's / FlashSparse's for few tokens): a
64-row weight tile is the wgmma A operand and the tokens (8..128, rounded up
to 8) are its N side, so M = 1 or 16 loads 8 or 16 rows of x, not 64.

Each CTA owns 64 weight rows (outputs), a block of tokens and a range of
128-wide K blocks (split-K, so that a few output tiles still fill the GPU).
A memory warpgroup streams x, weight, scale (and zero-point) tiles through a
TMA ring; the compute warpgroup:

* weight-only (W8A16 / W4A16): loads the int8 / packed int4 tile into
  registers and dequantizes it without int-to-float converts (a quarter-rate
  instruction on sm_90): the 8-bit code ``u`` is shifted into the mantissa of
  the fp32 constant 128.0 (``0x43000000 | u << 15`` is ``128 + u / 2``,
  exact), so ``(u - z) * s`` becomes one FMA with per-row constants,
  ``v * 2s - (256 + z) s``: zero points cost nothing extra. The bf16/fp16
  tile goes to one of two staging buffers and wgmma runs asynchronously, so
  the dequantization of step k+1 overlaps the wgmma of step k (one group in
  flight, ``wgmma_wait(1)``).
* W8A8: int8 x int8 wgmma from shared memory. Group-wise weight scales: a
  fresh int32 accumulator per 128-wide block, scaled by the weight rows'
  scales into the fp32 sum. Per-channel scales (one group spans K): one int32
  accumulator over the CTA's whole K range, asynchronous, converted once.
  The per-token activation scales are applied in the XLA epilogue that sums
  the splits.

Scales (and zero points) are read as stored, ``[Np, K / 128]``: one TMA slab
of ``64 x 8..32`` columns per CTA, starting at a multiple of 8 (splits are
rounded to whole slabs unless that leaves SMs idle with "tma_add"), the
step's column picked in registers; shapes that do not fit a slab (groups
other than 128, ``K / 128`` neither 4 nor a multiple of 8, splits over 32
blocks) stream
a ``[K / 128, Np]`` copy per K block instead.

Split-K (``SwapConfig.split_k_reduction``, see ``_mgpu.SPLIT_K_REDUCTIONS``):
by default ("tma_add") each CTA reduce-adds its fp32 ``[64, block_m]`` tile
into one zero-initialised fp32 ``[Np, Mp]`` accumulator with a TMA store (the
adds happen in L2), so a split costs no DRAM bytes; the order of the adds, and
so the last bits of the result, vary run to run. "partials" writes fp32
``[splits, Np, Mp]`` summed by XLA in a fixed order (bitwise reproducible;
``splits x`` the token-padded output, ~6% of a 4096 x 4096 int4 weight's
bytes at M = 1, read back once more by XLA). With one split the kernel writes
the output directly, in the activation dtype for weight-only formats.

Budget per CTA (predicted): shared memory ``slots x (block_m x 256 + 64 x 128
(int8) or 64 x 64 (int4)) + 2 x 64 x 128 x 2 staging + 64 x block_m x 4 +
2 x 64 x 32 x 4`` bytes (4 slots: ~150 KiB at block_m=64 with int8; ~70 KiB for int4 at M <= 16,
so 3 CTAs fit an SM); registers per compute thread: ``block_m / 2`` fp32
accumulator values, 64 for a dequantized half tile in fp32, up to 16 per
scale slab, well under the 232 given to the compute warpgroup.
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

ROWS = 64  # weight rows per CTA: the wgmma M of one warpgroup
BLOCK_K = 128  # == quantization.PACK_BLOCK
SMEM_BYTES = 227 * 1024
NUM_SMS = 132  # H100 SXM: fewer CTAs leave SMs idle
MAGIC_128 = 0x43000000  # fp32 128.0; the code goes into mantissa bits 15..22


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    """``block_m``: tokens per CTA (None: M rounded up to 8, at most 64)."""

    block_m: int | None = None
    max_concurrent_steps: int = 4
    k_splits: int | None = None  # None: aim for ``target_ctas`` CTAs.
    target_ctas: int = 264
    # "tma_add", "partials", or None: "tma_add" where available (_mgpu.SPLIT_K_REDUCTIONS).
    split_k_reduction: str | None = None

    def __post_init__(self):
        _mgpu.check_split_k_reduction(self.split_k_reduction)
        if self.block_m is not None and (self.block_m % 8 or not 8 <= self.block_m <= 128):
            raise ValueError(f"block_m={self.block_m} must be a multiple of 8 in [8, 128]")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"k_splits={self.k_splits} must be >= 1")

    def block_m_for(self, m: int) -> int:
        return self.block_m or min(64, -(-m // 8) * 8)

    def splits_for(self, output_tiles: int, k_blocks: int, fill_sms: bool = False) -> int:
        """K splits before slab rounding. ``fill_sms`` (splits cost no DRAM bytes,
        "tma_add"): when >= 4 blocks per split leaves SMs idle, go down to 2."""
        if self.k_splits is not None:
            return max(1, min(self.k_splits, k_blocks))
        # >= 4 K blocks per split so the ring has something to overlap.
        splits = max(1, min(cdiv(self.target_ctas, output_tiles), k_blocks // 4 or 1))
        if fill_sms and output_tiles * splits < NUM_SMS:
            splits = max(splits, min(cdiv(self.target_ctas, output_tiles), k_blocks // 2 or 1))
        return splits


CODE_BITS = 0xFF << 15  # where an 8-bit code sits in the fp32 pattern
NIBBLE_BITS = 0xF << 15


def magic_patterns(raw, bits: int, signed: bool):
    """Stored integers (int32, as loaded) -> fp32 bit patterns ``0x43000000 | u << 15``.

    ``u`` is the unsigned code: the nibble (int4: two patterns, low then high
    nibble), the byte (uint8), or the byte + 128 (int8, zero point 128). Each
    pattern is one shift and one masked OR / XOR (a LOP3 with constants).
    """
    if bits == 4:
        low = (lax.shift_left(raw, 15) & NIBBLE_BITS) | MAGIC_128
        high = (lax.shift_left(raw, 11) & NIBBLE_BITS) | MAGIC_128
        return [low, high]
    if signed:  # Sign-extended byte: keep its 8 bits and flip the top one (+128).
        return [(lax.shift_left(raw, 15) & CODE_BITS) ^ (MAGIC_128 | 0x80 << 15)]
    return [lax.shift_left(raw, 15) | MAGIC_128]


def dequantize_patterns(patterns, mult, bias, dtype):
    """fp32 patterns of ``128 + u / 2`` -> ``(u - z) * s`` as ``dtype``, no int-to-float convert.

    ``mult = 2 s`` and ``bias = -(256 + z) s`` (fp32, broadcast to ``patterns``):
    ``(128 + u / 2) * 2 s - (256 + z) s = (u - z) s`` with one FMA whose
    rounding error (~2^-24 * 384 s) is far below bf16's.
    """
    v = lax.bitcast_convert_type(patterns, jnp.float32)
    return (v * mult + bias).astype(dtype)


def _kernel(
    x_ref,
    w_ref,
    scale_ref,
    zero_ref,
    o_ref,
    x_smem,
    w_smem,
    scale_smem,
    zero_smem,
    staging_smem,
    o_smem,
    slab_barrier,
    loaded,
    consumed,
    *,
    reduce: bool,
    slab_width: int | None,
    bits: int,
    w8a8: bool,
    per_channel: bool,
    signed_codes: bool,
    static_zero: float | None,
    blocks_per_split: int,
    k_blocks: int,
    block_m: int,
    num_slots: int,
):
    n_tile = lax.axis_index("n_tiles")
    split = lax.axis_index("k_splits")
    m_tile = lax.axis_index("m_tiles")
    wg = lax.axis_index("wg")
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, k_blocks)
    rows = pl.ds(n_tile * ROWS, ROWS)
    tokens = pl.ds(m_tile * block_m, block_m)
    w_cols = BLOCK_K if bits == 8 else BLOCK_K // 2
    per_row = plgpu.Layout.WGMMA.reduce(1)  # a [ROWS] vector along the tile's rows
    acc_shape = (ROWS, block_m)
    # Scales (and zero points) come either as one [ROWS, slab_width] slab of
    # the stored [Np, K / 128] layout per CTA, or, streamed per K block, from
    # a [K / 128, Np] copy; per-channel W8A8 reads its one row at the end.
    streamed_scales = not per_channel and slab_width is None

    @pl.when(wg == 0)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        loaded_x, loaded_w, *loaded_rest = loaded
        consumed_x, consumed_w, *consumed_rest = consumed

        def release_weight_side(slot):
            plgpu.barrier_arrive(consumed_w.at[slot])
            for barrier in consumed_rest:
                plgpu.barrier_arrive(barrier.at[slot])

        if slab_width is not None:
            # One TMA per CTA; column j of the slab is K block lo + j. A column
            # is picked in registers (a masked sum over the 4 lanes sharing a
            # row): strided SMEM loads do not lower in jax 0.11.
            slabs = [scale_smem] + ([zero_smem] if static_zero is None else [])
            refs = [scale_ref] + ([zero_ref] if static_zero is None else [])
            # The slab starts at the multiple of 8 at or below ``lo`` (TMA boxes of
            # the tiled slab start on a tile); past the last group TMA fills zeros.
            slab_start = _mgpu.floordiv(lo, 8) * 8
            for i, (ref, slab) in enumerate(zip(refs, slabs, strict=True)):
                columns_of_split = pl.ds(pl.multiple_of(slab_start, 8), slab_width)
                plgpu.copy_gmem_to_smem(ref.at[rows, columns_of_split], slab, slab_barrier.at[i])
            for i in range(len(slabs)):
                plgpu.barrier_wait(slab_barrier.at[i])
            slab_values = [plgpu.load(slab, layout=plgpu.Layout.WGMMA) for slab in slabs]
            columns = plgpu.layout_cast(
                lax.broadcasted_iota(jnp.int32, (ROWS, slab_width), 1), plgpu.Layout.WGMMA
            )

            def row_params(k_step, slot):
                del slot
                picked = [
                    jnp.sum(jnp.where(columns == k_step - slab_start, v, 0.0), axis=1)
                    for v in slab_values
                ]
                return picked[0], (picked[1] if static_zero is None else static_zero)
        else:

            def row_params(k_step, slot):
                del k_step
                scale = plgpu.load(scale_smem.at[slot], layout=per_row)
                if static_zero is None:
                    return scale, plgpu.load(zero_smem.at[slot], layout=per_row)
                return scale, static_zero

        def dequantized(k_step, slot):
            """The weight tile of ``slot`` as ``[ROWS, 128]`` in halves of the staging dtype."""
            for barrier in (loaded_w, *loaded_rest):
                plgpu.barrier_wait(barrier.at[slot])
            raw = plgpu.load(w_smem.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.int32)
            scale, zero = row_params(k_step, slot)
            release_weight_side(slot)  # Everything we need is in registers now.
            mult = lax.broadcast_in_dim(scale + scale, raw.shape, [0])
            bias = lax.broadcast_in_dim(-(256.0 + zero) * scale, raw.shape, [0])
            patterns = magic_patterns(raw, bits, signed_codes)
            return [dequantize_patterns(p, mult, bias, staging_smem.dtype) for p in patterns]

        def weight_only(acc_ref):
            def step(k_step, _):
                slot = _mgpu.slot_of(k_step, lo, num_slots)
                stage = staging_smem.at[lax.rem(k_step - lo, 2)]
                halves = dequantized(k_step, slot)
                width = BLOCK_K // len(halves)
                for i, half in enumerate(halves):
                    stage.at[:, pl.ds(i * width, width)][...] = half
                plgpu.commit_smem()  # Staged weights must be visible to wgmma.
                plgpu.barrier_wait(loaded_x.at[slot])
                plgpu.wgmma(acc_ref, stage, x_smem.at[slot].T)
                # Step k-1's wgmma is done: its x slot and staging buffer are free.
                plgpu.wgmma_wait(1)

                @pl.when(k_step > lo)
                def _():
                    plgpu.barrier_arrive(consumed_x.at[_mgpu.slot_of(k_step - 1, lo, num_slots)])

            lax.fori_loop(lo, hi, step, None)
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(consumed_x.at[_mgpu.slot_of(hi - 1, lo, num_slots)])
            return acc_ref[...]

        def int8_per_channel(acc_ref):
            """One int32 accumulator over the whole K range, waited one step behind."""

            def step(k_step, _):
                slot = _mgpu.slot_of(k_step, lo, num_slots)
                plgpu.barrier_wait(loaded_w.at[slot])
                plgpu.barrier_wait(loaded_x.at[slot])
                plgpu.wgmma(acc_ref, w_smem.at[slot], x_smem.at[slot].T)
                plgpu.wgmma_wait(1)

                @pl.when(k_step > lo)
                def _():
                    previous = _mgpu.slot_of(k_step - 1, lo, num_slots)
                    plgpu.barrier_arrive(consumed_x.at[previous])
                    plgpu.barrier_arrive(consumed_w.at[previous])

            lax.fori_loop(lo, hi, step, None)
            plgpu.wgmma_wait(0)
            last = _mgpu.slot_of(hi - 1, lo, num_slots)
            plgpu.barrier_arrive(consumed_x.at[last])
            plgpu.barrier_arrive(consumed_w.at[last])
            return acc_ref[...]

        def int8_group_wise(k_step, acc):
            slot = _mgpu.slot_of(k_step, lo, num_slots)
            for barrier in (loaded_x, loaded_w, *loaded_rest):
                plgpu.barrier_wait(barrier.at[slot])

            def int_mma(int_acc):
                plgpu.wgmma(int_acc, w_smem.at[slot], x_smem.at[slot].T)
                return int_acc[...]

            block = pl.run_scoped(int_mma, plgpu.ACC(acc_shape, jnp.int32))
            scale, _ = row_params(k_step, slot)
            plgpu.barrier_arrive(consumed_x.at[slot])
            release_weight_side(slot)
            return acc + block.astype(jnp.float32) * lax.broadcast_in_dim(scale, acc_shape, [0])

        if not w8a8:
            acc = pl.run_scoped(weight_only, plgpu.ACC(acc_shape, jnp.float32))
        elif per_channel:
            acc = pl.run_scoped(int8_per_channel, plgpu.ACC(acc_shape, jnp.int32))
            # The one scale row is read once, after the K loop (slot 0 of its ring).
            plgpu.copy_gmem_to_smem(scale_ref.at[0, rows], scale_smem.at[0], loaded_rest[0].at[0])
            plgpu.barrier_wait(loaded_rest[0].at[0])
            scale = plgpu.load(scale_smem.at[0], layout=per_row)
            acc = acc.astype(jnp.float32) * lax.broadcast_in_dim(scale, acc_shape, [0])
        else:
            acc = lax.fori_loop(lo, hi, int8_group_wise, _mgpu.zeros(acc_shape))
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        _mgpu.store_output_tile(o_smem, o_ref, split, (rows, tokens), reduce)

    @pl.when(wg == 1)
    def _memory():
        k_block = lambda step: pl.ds(step * BLOCK_K, BLOCK_K)  # noqa: E731
        streams = [
            Stream(lambda s: x_ref.at[tokens, k_block(s)], x_smem, loaded[0], consumed[0]),
            Stream(
                lambda s: w_ref.at[rows, pl.ds(s * w_cols, w_cols)], w_smem, loaded[1], consumed[1]
            ),
        ]
        if streamed_scales:
            streams.append(
                Stream(lambda s: scale_ref.at[s, rows], scale_smem, loaded[2], consumed[2])
            )
        if streamed_scales and static_zero is None:
            streams.append(
                Stream(lambda s: zero_ref.at[s, rows], zero_smem, loaded[3], consumed[3])
            )
        _mgpu.produce(streams, lo, hi, num_slots)


MAX_SLAB_WIDTH = 32


def _round_up_8(n: int) -> int:
    return -(-n // 8) * 8


def split_plan(
    qw, k_blocks: int, output_tiles: int, config: SwapConfig, reduction: str, per_channel: bool
) -> tuple[int, int, int | None]:
    """``(splits, blocks_per_split, slab_width)``; ``slab_width`` None: scales streamed per block.

    The slab is a TMA box of the stored ``[Np, K / 128]`` scales starting at a
    multiple of 8 columns: it needs one group per K block, 4 or a multiple of
    8 groups, and at most 32 columns (they live in registers: ``width / 2``
    per thread). Splits are rounded up to whole slabs of 8..32 blocks, so that
    each starts where its slab does, unless (with "tma_add") that would leave
    SMs idle: then splits keep their size and each reads the slab of the
    multiples of 8 around it (a wider slab: more columns to pick from).
    """
    tma_add = reduction == "tma_add"
    splits = config.splits_for(output_tiles, k_blocks, fill_sms=tma_add)
    blocks_per_split = cdiv(k_blocks, splits)
    splits = cdiv(k_blocks, blocks_per_split)
    groups = qw.scales.shape[1]
    # TMA of the 8-column tiled slab: rows of 16 bytes and, past 8 columns, a
    # whole number of tiles (K = 1536, 12 groups, failed to lower before).
    if per_channel or qw.group_size != BLOCK_K or not (groups == 4 or groups % 8 == 0):
        return splits, blocks_per_split, None
    whole = _round_up_8(blocks_per_split)
    whole_fits = whole <= MAX_SLAB_WIDTH
    if whole_fits and (not tma_add or output_tiles * cdiv(k_blocks, whole) >= NUM_SMS):
        return cdiv(k_blocks, whole), whole, whole
    starts = range(0, k_blocks, blocks_per_split)
    width = _round_up_8(max(lo % 8 + min(blocks_per_split, k_blocks - lo) for lo in starts))
    if width <= MAX_SLAB_WIDTH:
        return splits, blocks_per_split, width
    if whole_fits:
        return cdiv(k_blocks, whole), whole, whole
    return splits, blocks_per_split, None


def per_block(per_group, group_size: int, k_blocks: int):
    """``[Np, Kp / group]`` -> ``[Kp / 128, Np]``: one row of scales per K block."""
    if group_size < BLOCK_K:
        raise ValueError(f"Mosaic quantized matmul needs group_size >= {BLOCK_K}, got {group_size}")
    per_k_block = jnp.repeat(per_group, group_size // BLOCK_K, axis=1)
    return per_k_block[:, :k_blocks].T.astype(jnp.float32)


def matmul(x, qw, *, x_scale=None, out_dtype=jnp.float32, config: SwapConfig | None = None):
    """x ``[M, Kp]`` (bf16/fp16, or int8 with ``x_scale [M]``: W8A8) -> ``[M, Np]``.

    The result is ``out_dtype`` when the kernel writes it directly (one K
    split, weight-only), fp32 otherwise.
    """
    config = config or SwapConfig()
    reduction = _mgpu.split_k_reduction_for(config.split_k_reduction)
    m, kp = x.shape
    np_ = qw.values.shape[0]
    if np_ % ROWS:
        raise ValueError(f"out_features padded to {np_} is not a multiple of {ROWS}")
    if kp % BLOCK_K:
        raise ValueError(f"x {x.shape} must be padded to a multiple of {BLOCK_K} inputs")
    w8a8 = x_scale is not None
    block_m = config.block_m_for(m)
    mp = -(-m // block_m) * block_m
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    k_blocks = kp // BLOCK_K
    per_channel = w8a8 and qw.scales.shape[1] == 1
    output_tiles = (np_ // ROWS) * (mp // block_m)
    splits, blocks_per_split, slab_width = split_plan(
        qw, k_blocks, output_tiles, config, reduction, per_channel
    )
    static_zero = None
    if qw.zeros is None:
        # Zero point of the codes the kernel dequantizes (int8 shifted to 0..255).
        static_zero = 8.0 if qw.bits == 4 else 128.0  # int8: see magic_patterns
    if per_channel:
        scales = qw.scales.T.astype(jnp.float32)  # [1, Np], read once per CTA
    elif slab_width is not None:
        scales = qw.scales  # as stored: no XLA transposition per call
    else:
        scales = per_block(qw.scales, qw.group_size, k_blocks)
    if static_zero is not None:
        zeros = jnp.zeros((1, 1), jnp.float32)  # Unused placeholder operand.
    elif slab_width is not None:
        zeros = qw.zeros
    else:
        zeros = per_block(qw.zeros, qw.group_size, k_blocks)
    num_slots = config.max_concurrent_steps
    w_cols = BLOCK_K if qw.bits == 8 else BLOCK_K // 2
    # x, weight, scales (per-channel W8A8: one slot, read once) and zero points.
    num_streams = 3 + (static_zero is None) if slab_width is None else 2
    slab_shape = (ROWS, slab_width or 8)
    slab_transforms = _mgpu.smem_transforms(jnp.float32, 8)
    staging_dtype = jnp.bfloat16 if w8a8 else x.dtype
    # One split writes the output itself (W8A8: fp32, the token scales come after).
    o_dtype = jnp.dtype(out_dtype) if splits == 1 and not w8a8 else jnp.dtype(jnp.float32)
    buffers = (
        plgpu.SMEM(
            (num_slots, block_m, BLOCK_K), x.dtype, transforms=_mgpu.smem_transforms(x.dtype)
        ),
        plgpu.SMEM(
            (num_slots, ROWS, w_cols),
            qw.values.dtype,
            transforms=_mgpu.smem_transforms(qw.values.dtype, w_cols),
        ),
        *(
            [plgpu.SMEM((num_slots, ROWS), jnp.float32)] * 2
            if slab_width is None
            else [plgpu.SMEM(slab_shape, jnp.float32, transforms=slab_transforms)] * 2
        ),
        plgpu.SMEM(
            (1 if w8a8 else 2, ROWS, BLOCK_K),
            staging_dtype,
            transforms=_mgpu.smem_transforms(staging_dtype),
        ),
        plgpu.SMEM((ROWS, block_m), o_dtype),
    )
    smem = sum(math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in buffers)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"SwapConfig(block_m={block_m}, max_concurrent_steps={num_slots}) needs "
            f"~{smem // 1024} KiB of shared memory, more than the {SMEM_BYTES // 1024} KiB "
            "of an H100: lower block_m or max_concurrent_steps"
        )
    kernel = functools.partial(
        _kernel,
        reduce=splits > 1 and reduction == "tma_add",
        slab_width=slab_width,
        bits=qw.bits,
        w8a8=w8a8,
        per_channel=per_channel,
        signed_codes=qw.bits == 8 and qw.zeros is None,
        static_zero=static_zero,
        blocks_per_split=blocks_per_split,
        k_blocks=k_blocks,
        block_m=block_m,
        num_slots=num_slots,
    )
    kernel_with = lambda out_type: plgpu.kernel(  # noqa: E731
        kernel,
        out_type=out_type,
        scratch_types=(
            *buffers,
            plgpu.Barrier(num_barriers=2),  # scale and zero-point slabs
            *_mgpu.ring_barriers(num_slots, num_streams, 1),
        ),
        grid=(np_ // ROWS, splits, mp // block_m),
        grid_names=("n_tiles", "k_splits", "m_tiles"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    y_t = _mgpu.split_k_output(
        kernel_with,
        (x, qw.values, scales, zeros),
        splits=splits,
        shape=(np_, mp),
        reduction=reduction,
        dtype=o_dtype,
    )
    if w8a8:
        y_t = y_t * jnp.pad(x_scale.astype(jnp.float32), (0, mp - m))[None, :]
    return y_t.T[:m]
