"""Sparse x dense matmul for Hopper (Pallas Mosaic GPU): load as sparse, compute as dense.

``y [M, N] = x [M, K] @ W`` with ``W`` a :class:`~pallax.pallas_kernels.SparseWeight`
(tiled bitmap, stored ``[N, K]``). Following FlashSparse's swap-and-transpose,
the kernel computes ``y^T = W^T x^T``: a decoded 64-row weight tile is the
wgmma A operand and the tokens are its N side (8..256), so a decode-sized M is
not padded to 64.

Each CTA owns one 64-row weight tile row, a block of tokens and a range of K
tiles (split-K). ``SpmmConfig.compute_warpgroups`` (default 2) decoding
warpgroups take alternate tiles, and one memory warpgroup feeds them:

* memory (the last wg), one step per 64x64 weight tile: TMA copies of the x
  tile and the tile's 512-byte bitmap into a ring of slots, and of the tile's
  nonzeros into a values ring (64 KiB) of chunks of ``value_chunk`` values:
  1024 (2 KB of bf16) by default, one ``cp.async.bulk`` and one mbarrier each
  (four 256-value TMA boxes on the same mbarrier when the values' byte length
  is not a multiple of 16). A CTA's nonzeros are contiguous in memory, so
  the fetched chunks are consecutive; a tile's span a data-dependent number of
  them (see :func:`_chunk_range`). Every decoding warpgroup waits for every
  chunk in order and releases each once, after the last of its own tiles that
  needs it;
* compute (wg 0 .. compute_warpgroups - 1) decodes each of its tiles into its
  own dense bf16/fp16 tile in shared memory (one thread per 32-bit bitmap
  word: popcount, a warp prefix sum by shuffles, then one shared-memory load
  per nonzero) and runs wgmma on it; at the end warpgroup 1 hands its fp32
  sum to warpgroup 0 through shared memory. Two decodes: "dense" handles all
  32 bits branch free; "bits" (weights with <= 25% nonzeros) zeroes the row
  and loops over the set bits only.

``SpmmConfig(compute_warpgroups=1, value_chunk=256, ring_values=8192)`` is the
kernel before issue 13 (one decoding warpgroup, 512-byte copies, 16 KB ring),
kept for A/B runs on the GPU. Budgets: 232 registers per compute thread, 40
for the memory warpgroup (one 384-thread CTA per SM); shared memory at bf16
values and block_m = 8: 64 KiB ring + 2 x 8 KiB staging + 4 slots x (1 KiB x +
512 B bitmap) + offsets (<= 4 KiB) + 2 KiB output, ~92 KiB.

The decode is per-thread code, which Pallas' Mosaic GPU dialect cannot
express in jax 0.11 (no gather, popcount, shuffles), so it is written once in
:func:`decode_thread` against a tiny op interface with two backends: MLIR
through ``plgpu.inline_mgpu`` on the GPU, and jax.numpy over the 128 threads
as arrays for GPU interpret mode and the CPU tests. (The deprecated Triton
dialect has gathers and would make this part easy.)

K splits (``SpmmConfig.split_k_reduction``, see ``_mgpu.SPLIT_K_REDUCTIONS``):
by default each CTA reduce-adds its fp32 ``[64, block_m]`` tile into one
zero-initialised fp32 ``[Np, Mp]`` accumulator with a TMA store ("tma_add":
no partials in DRAM, so the split count is no longer capped by their bytes;
the order of the adds, and so the last bits, vary run to run); "partials"
writes fp32 ``[splits, Np, Mp]`` summed in XLA (bitwise reproducible), with
the splits capped so that those stay within ``MAX_PARTIAL_FRACTION`` of the
weight's bytes. One split writes the output directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallax.pallas_kernels import _mgpu
from pallax.pallas_kernels._mgpu import cdiv, mma

TILE = 64  # == sparse.TILE_ROWS == sparse.TILE_K
WORDS = 128  # bitmap words per tile: one per compute thread
# Values per copy: a contiguous 1D copy is one ``cp.async.bulk`` with no box
# limit, so 1024 (2 KB of bf16, one mbarrier) is the default; 256 is the
# kernel before issue 13 (512 B per copy and per mbarrier), kept for A/B runs.
VALUE_CHUNKS = (256, 1024)
TMA_BOX = 256  # elements per dimension of a tiled TMA copy
# Values ring: a power of two of values (index wrap by mask), 64 KiB by
# default. Two decoding warpgroups hold at most 2 x 5 chunks of 2 KB (full
# tiles) while the rest, >= 44 KiB, is in flight (one CTA per SM: the two
# compute warpgroups take 232 registers each).
RING_BYTES = 64 * 1024
WARP = 32
SMEM_BYTES = 227 * 1024  # per block on sm_90
NUM_SMS = 132  # H100 SXM (one CTA per SM: 2 x 232 + 40 registers x 128 threads)
# Decode strategies. "dense" visits all 32 bits of a thread's word (~9
# instructions each, 32 independent loads in flight). "bits" zeroes the row
# and visits only the set bits, BITS_UNROLL at a time (their loads issued
# together so one shared-memory latency covers them; stores predicated), ~12
# instructions a slot. A warp runs ceil(max over its lanes of popcount / 8)
# groups: 2 at density 0.25 (uniform random bits: max popcount ~13), 1 at 0.1.
# Break-even is near density 0.4; switching at 0.25 leaves a margin for
# clustered rows, where a warp's max popcount sets the loop count.
DECODES = ("dense", "bits")
BITS_UNROLL = 8
BITS_DECODE_MAX_DENSITY = 0.25


# Default split-K with "partials": fp32 partials (written by the kernel, summed
# by XLA) at most this fraction of the weight's bytes, so decode stays within
# ~1.1x its ideal bytes. "tma_add" writes none, so only the tiles per split limit it.
MAX_PARTIAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class SpmmConfig:
    """Tile sizes. ``block_m=None``: tokens rounded up to 8, at most 128 per CTA."""

    block_m: int | None = None
    max_concurrent_steps: int = 4
    k_splits: int | None = None  # None: aim for ``target_ctas`` CTAs.
    target_ctas: int = 264
    decode: str | None = None  # "dense", "bits", or None: by the weight's density.
    # Warpgroups that decode, on alternate tiles (1: the kernel before issue 13).
    compute_warpgroups: int = 2
    value_chunk: int = 1024  # values per copy and per mbarrier (256: before issue 13)
    # Values ring size; None: RING_BYTES of the values' dtype (8192: before issue 13).
    ring_values: int | None = None
    # "tma_add", "partials", or None: "tma_add" where available (_mgpu.SPLIT_K_REDUCTIONS).
    split_k_reduction: str | None = None

    def __post_init__(self):
        _mgpu.check_split_k_reduction(self.split_k_reduction)
        if self.decode not in (None, *DECODES):
            raise ValueError(f"decode={self.decode!r} must be one of {DECODES} or None")
        if self.compute_warpgroups not in (1, 2):
            raise ValueError(f"compute_warpgroups={self.compute_warpgroups} must be 1 or 2")
        if self.value_chunk not in VALUE_CHUNKS:
            raise ValueError(f"value_chunk={self.value_chunk} must be one of {VALUE_CHUNKS}")
        if self.block_m is not None and (self.block_m % 8 or not 8 <= self.block_m <= 256):
            raise ValueError(f"block_m={self.block_m} must be a multiple of 8 in [8, 256]")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"k_splits={self.k_splits} must be >= 1")
        if self.ring_values is not None:
            self.ring_values_for(2)  # validates

    def ring_values_for(self, itemsize: int) -> int:
        """Ring size in values for values of ``itemsize`` bytes (checked)."""
        r = self.ring_values or RING_BYTES // itemsize
        if r & (r - 1) or r % self.value_chunk:
            raise ValueError(
                f"ring_values={r} must be a power of two and a multiple of "
                f"value_chunk={self.value_chunk}"
            )
        # Every decoding warpgroup may hold the chunks of one full tile (4096
        # nonzeros, unaligned: one chunk more) while the memory one refills.
        if r // self.value_chunk < self.compute_warpgroups * (TILE * TILE // self.value_chunk + 1):
            raise ValueError(
                f"ring_values={r} holds {r // self.value_chunk} chunks of {self.value_chunk}; "
                f"compute_warpgroups={self.compute_warpgroups} need "
                f"{self.compute_warpgroups * (TILE * TILE // self.value_chunk + 1)}"
            )
        return r

    def decode_for(self, density: float) -> str:
        return self.decode or ("bits" if density <= BITS_DECODE_MAX_DENSITY else "dense")

    def block_m_for(self, m: int) -> int:
        return self.block_m or min(128, -(-m // 8) * 8)

    def splits_for(
        self, output_tiles: int, k_tiles: int, split_bytes: int = 0, weight_bytes: int = 0
    ) -> int:
        """Split-K factor. ``split_bytes``: the fp32 partial sums one more split
        writes (and XLA reads back); by default they stay within
        ``MAX_PARTIAL_FRACTION`` of the ``weight_bytes`` the kernel streams.
        Without partials ("tma_add": ``split_bytes=0``) splits cost no DRAM
        bytes: the count up to the target that wastes the least of the last
        wave of CTAs (one CTA per SM) wins, the larger on a tie."""
        if self.k_splits is not None:
            return max(1, min(self.k_splits, k_tiles))
        # Keep >= 4 tiles per split so the rings have something to overlap, and
        # <= 255 so a CTA's offsets fit one TMA box.
        most = max(1, min(cdiv(self.target_ctas, output_tiles), k_tiles // 4 or 1))
        if split_bytes:  # a 90%-sparse weight is small: partials must not rival it
            splits = max(1, min(most, int(MAX_PARTIAL_FRACTION * weight_bytes) // split_bytes))
        else:
            splits = max(range(1, most + 1), key=lambda s: (wave_efficiency(output_tiles * s), s))
        return max(splits, cdiv(k_tiles, 255))


def wave_efficiency(ctas: int, num_sms: int = NUM_SMS) -> float:
    """Busy fraction of the SMs over the waves ``ctas`` take at one CTA per SM."""
    return ctas / (cdiv(ctas, num_sms) * num_sms)


# ----------------------------------------------------------------------------
# Tile decode, written once for both backends.


def _first_of_thread(ops, lane, word, warp_start):
    """Ring index of the thread's first nonzero. Word order is value order, so
    it follows those of the lower lanes: an exclusive prefix sum of popcounts
    across the warp (Hillis-Steele with shuffles)."""
    count = ops.popc(word)
    inclusive = count
    for delta in (1, 2, 4, 8, 16):
        inclusive = inclusive + ops.select(lane >= delta, ops.shfl_up(inclusive, delta), 0)
    return warp_start + inclusive - count


def decode_thread(ops, lane, word, warp_start, strategy: str = "dense"):
    """Writes one thread's 32 weights of a 64x64 tile through ``ops``.

    ``word``: the thread's bitmap word (thread ``t`` holds word ``t``: row
    ``t // 2``, inputs ``32 (t % 2) ..``); ``warp_start``: ring index of the
    first nonzero of the thread's warp (16 rows). ``strategy`` "dense": every
    bit, branch free (rank of bit ``i`` = popcount of the bits below it);
    "bits": zero the 32 weights, then loop over the set bits only.
    """
    first = _first_of_thread(ops, lane, word, warp_start)
    if strategy == "dense":
        out = []
        for i in range(WARP):
            rank = ops.popc(word & ((1 << i) - 1)) if i else 0
            value = ops.load_ring((first + rank) & ops.ring_mask)
            out.append(ops.select(((word >> i) & 1) != 0, value, ops.zero))
        ops.store_row(out)
        return

    ops.store_row([ops.zero] * WARP)

    def set_bits(group, bits):  # nonzeros 8 g .. 8 g + 7 of the thread
        base = first + group * BITS_UNROLL
        values = [ops.load_ring((base + j) & ops.ring_mask) for j in range(BITS_UNROLL)]
        for value in values:  # each goes to the lowest bit still set
            ops.store_at(ops.ctz(bits), value, bits != 0)
            bits = bits & (bits - 1)
        return bits

    groups = (ops.popc(word) + BITS_UNROLL - 1) >> (BITS_UNROLL.bit_length() - 1)
    ops.loop(groups, set_bits, word)


class _JnpOps:
    """The 128 threads as arrays: ``x[t]`` is thread ``t``'s register."""

    def __init__(self, ring, dtype):
        self.ring = ring
        self.ring_mask = ring.shape[0] - 1  # a power of two
        self.zero = jnp.zeros((), dtype)
        self.dtype = dtype
        self.out = jnp.zeros((WORDS, WARP), dtype)  # thread t's 32 weights
        self.active = True  # threads still inside ``loop``

    @staticmethod
    def popc(x):
        return lax.population_count(x).astype(jnp.int32)

    @staticmethod
    def ctz(x):
        return lax.population_count((x & (~x + 1)) - 1).astype(jnp.int32)

    @staticmethod
    def shfl_up(x, delta):
        """``__shfl_up_sync``: lane ``l`` reads lane ``l - delta``; lower lanes keep theirs."""
        warps = x.reshape(-1, WARP)
        shifted = jnp.concatenate([warps[:, :delta], warps[:, :-delta]], axis=1)
        return shifted.reshape(x.shape)

    @staticmethod
    def select(cond, a, b):
        return jnp.where(cond, a, b)

    def load_ring(self, index):
        return jnp.take(self.ring, index, axis=0).astype(self.dtype)

    def store_row(self, values):
        self.out = jnp.broadcast_to(jnp.stack(values, axis=-1), self.out.shape)

    def store_at(self, pos, value, predicate):
        threads = jnp.arange(WORDS)
        pos = jnp.minimum(pos, WARP - 1)  # ctz(0) = 32 where the predicate is off
        self.out = self.out.at[threads, pos].set(
            jnp.where(self.active & predicate, value, self.out[threads, pos])
        )

    def loop(self, count, body, carry):
        """Thread ``t`` runs ``count[t] <= 32 / BITS_UNROLL`` iterations; all
        threads run the maximum here, masked."""
        for k in range(WARP // BITS_UNROLL):
            self.active = k < count
            carry = body(k, carry)
        self.active = True
        return carry


class _Counted:
    """A register of the counting backend: every operator is one instruction."""

    def __init__(self, counts):
        self.counts = counts

    def _op(self, _other=None, pipe="alu"):
        self.counts[pipe] += 1
        return _Counted(self.counts)

    __add__ = __radd__ = __sub__ = __and__ = __xor__ = __mul__ = _op
    __rshift__ = __lshift__ = __ge__ = __ne__ = _op


class _CountingOps:
    """A third backend of :func:`decode_thread`: counts one thread's instructions
    by pipe instead of computing. One per MLIR op we emit (ptxas may fuse some:
    a shift and a mask into one LOP3); ``set_bit_groups`` stands for the
    data-dependent trip count of the "bits" loop."""

    # Per 16-byte store of 8 values: 4 byte-permutes to pack them, 2 to form
    # the swizzled address (the row part is shared by the thread's stores).
    PACK_AND_ADDRESS = 6
    ADDRESS_OF_COLUMN = 6  # swizzled_offset with a run-time column
    ring_mask = 0

    def __init__(self, set_bit_groups: int):
        self.counts = {"alu": 0, "xu": 0, "shfl": 0, "lds": 0, "sts": 0}
        self.groups = set_bit_groups
        self.zero = None

    def reg(self):
        return _Counted(self.counts)

    def popc(self, x):
        self.counts["xu"] += 1
        return self.reg()

    def ctz(self, x):  # bit reverse + find leading one
        self.counts["xu"] += 2
        return self.reg()

    def shfl_up(self, x, delta):
        self.counts["shfl"] += 1
        return self.reg()

    def select(self, cond, a, b):
        self.counts["alu"] += 1
        return self.reg()

    def load_ring(self, index):
        self.counts["alu"] += 1  # byte address from the ring index
        self.counts["lds"] += 1
        return self.reg()

    def store_row(self, values):
        self.counts["alu"] += 4 * self.PACK_AND_ADDRESS
        self.counts["sts"] += 4

    def store_at(self, pos, value, predicate):
        self.counts["alu"] += self.ADDRESS_OF_COLUMN
        self.counts["sts"] += 1

    def loop(self, count, body, carry):
        for _ in range(self.groups):
            self.counts["alu"] += 2  # counter and exit test
            carry = body(self.reg(), carry)
        return carry


def decode_op_counts(strategy: str, set_bit_groups: int = 1) -> dict[str, int]:
    """Instructions one thread issues to decode its 32 weights of a tile, by
    pipe, counted from :func:`decode_thread` itself (plus the MLIR backend's
    prologue: thread indices, the word load, the warp's start). A tile is 4
    warps; see the spmm section of ``benchmarks/RESULTS.md`` for the
    resulting time per tile."""
    ops = _CountingOps(set_bit_groups)
    ops.counts["alu"] += 5 + 1 + 6  # row/col/lane/warp, word address, start select chain
    ops.counts["lds"] += 1  # the bitmap word
    decode_thread(ops, ops.reg(), ops.reg(), ops.reg(), strategy)
    return dict(ops.counts)


def decode_tile_reference(words, ring, warp_starts, dtype, strategy: str = "dense"):
    """jnp backend of :func:`decode_thread`: uint32 ``[128]`` words -> ``[64, 64]`` tile."""
    lanes = jnp.arange(WORDS, dtype=jnp.int32)
    starts = jnp.repeat(jnp.asarray(warp_starts, jnp.int32), WARP)
    ops = _JnpOps(ring, dtype)
    decode_thread(ops, lanes % WARP, words.astype(jnp.uint32), starts, strategy)
    return ops.out.reshape(TILE, TILE)


def swizzled_offset(row, col, cols: int):
    """Element offset of ``(row, col)`` in a ``[rows, cols]`` 16-bit SMEM ref
    with ``smem_transforms`` (8 x 64 tiles, 128-byte swizzle): the 16-byte
    chunk index within a 128-byte row is XORed with ``row % 8``. Works on
    Python ints and on the MLIR wrapper below."""
    tile = (row >> 3) * (cols // TILE) + (col >> 6)
    chunk = ((col & (TILE - 1)) >> 3) ^ (row & 7)
    return tile * (8 * TILE) + (row & 7) * TILE + (chunk << 3) + (col & 7)


def _mlir_decode(ctx, words_ref, ring_ref, staging_ref, warp_starts, *, strategy: str):
    """MLIR backend (inline_mgpu body): decodes one tile into ``staging_ref``."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, nvvm, vector
    from jax._src.lib.mlir.dialects import math as mlir_math
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    index = ir.IndexType.get()

    def const(v):
        return arith.constant(i32, v)

    class Reg:
        """A per-thread i32 register with Python operators (``>>`` is logical)."""

        def __init__(self, value):
            self.value = value

        @staticmethod
        def lift(x):
            return x.value if isinstance(x, Reg) else const(int(x))

        def __add__(self, o):
            return Reg(arith.addi(self.value, Reg.lift(o)))

        __radd__ = __add__

        def __sub__(self, o):
            return Reg(arith.subi(self.value, Reg.lift(o)))

        def __and__(self, o):
            return Reg(arith.andi(self.value, Reg.lift(o)))

        def __xor__(self, o):
            return Reg(arith.xori(self.value, Reg.lift(o)))

        def __mul__(self, o):
            return Reg(arith.muli(self.value, Reg.lift(o)))

        def __rshift__(self, o):
            return Reg(arith.shrui(self.value, Reg.lift(o)))

        def __lshift__(self, o):
            return Reg(arith.shli(self.value, Reg.lift(o)))

        def __ge__(self, o):
            return arith.cmpi(arith.CmpIPredicate.uge, self.value, Reg.lift(o))

        def __ne__(self, o):
            return arith.cmpi(arith.CmpIPredicate.ne, self.value, Reg.lift(o))

    def flat(ref):
        return mgpu_utils.memref_reshape(ref, (int(np.prod(ir.MemRefType(ref.type).shape)),))

    staging_flat = flat(staging_ref)
    ring_ref = flat(ring_ref)
    out_type = ir.MemRefType(staging_flat.type).element_type
    ring_type = ir.MemRefType(ring_ref.type).element_type
    cols = int(ir.MemRefType(staging_ref.type).shape[1]) * TILE
    thread = Reg(arith.remui(mgpu_utils.thread_idx(), const(WORDS)))
    row, col0 = thread >> 1, (thread & 1) << 5  # the thread's 32 weights

    def at(offset):
        return [arith.index_cast(index, offset.value)]

    class Ops:
        zero = arith.constant(out_type, 0.0)
        ring_mask = int(ir.MemRefType(ring_ref.type).shape[0]) - 1

        @staticmethod
        def popc(x):
            return Reg(mlir_math.ctpop(x.value))

        @staticmethod
        def ctz(x):
            return Reg(mlir_math.cttz(x.value))

        @staticmethod
        def shfl_up(x, delta):
            # Clamp 0: lanes below ``delta`` get their own value back.
            return Reg(nvvm.shfl_sync(const(-1), x.value, const(delta), const(0), nvvm.ShflKind.up))

        @staticmethod
        def select(cond, a, b):
            if isinstance(a, Reg):
                return Reg(arith.select(cond, a.value, Reg.lift(b)))
            return arith.select(cond, a, b)

        @staticmethod
        def load_ring(i):
            value = memref.load(ring_ref, at(i))
            if ring_type != out_type:  # bf16 <-> fp16 goes through fp32
                if ring_type != f32:
                    value = arith.extf(f32, value)
                value = arith.truncf(out_type, value)
            return value

        @staticmethod
        def store_row(values):  # four 16-byte stores
            vec_type = ir.VectorType.get((8,), out_type)
            for j in range(4):
                vec = vector.from_elements(vec_type, values[8 * j : 8 * j + 8])
                vector.store(vec, staging_flat, at(swizzled_offset(row, col0 + 8 * j, cols)))

        @staticmethod
        def store_at(pos, value, predicate):
            with mgpu_utils.when(predicate):
                memref.store(value, staging_flat, at(swizzled_offset(row, col0 + pos, cols)))

        @staticmethod
        def loop(count, body, carry):
            @mgpu_utils.fori(count.value, carry.value)
            def result(k, carry):
                return body(Reg(k), Reg(carry)).value

            return Reg(result.results[0])

    lane = thread & (WARP - 1)
    word = Reg(memref.load(words_ref, at(thread)))
    warp = thread >> 5
    starts = [Reg(s.registers.flat[0]) for s in warp_starts]  # splat scalars
    start = starts[0]
    for w in range(1, 4):  # This warp's start: a select chain over the 4 scalars.
        is_w = arith.cmpi(arith.CmpIPredicate.eq, warp.value, const(w))
        start = Ops.select(is_w, starts[w], start)
    decode_thread(Ops, lane, word, start, strategy)
    return ()


# ----------------------------------------------------------------------------
# The kernel.


def _chunk_range(start, end, g_hi, chunk: int = 1024):
    """Chunks of the values ring for a tile whose nonzeros are ``[start, end)``.

    ``g_hi``: one past the last chunk (in units of ``chunk`` values of the
    weight) fetched so far. Returns ``(n_new, g_hi')``: how many chunks to
    fetch and the new ``g_hi``. A tile's first chunk may be the previous
    tile's last one, which is then still in the ring.
    """
    a, b = _tile_chunks(start, end, chunk)
    n_new = jnp.where(end > start, b - jnp.maximum(a, g_hi), 0)
    return n_new, jnp.where(end > start, b, g_hi)


def _tile_chunks(start, end, chunk: int):
    """``[a, b)``: the weight chunks holding nonzeros ``[start, end)`` (empty: ``b == a``)."""
    a = lax.div(start, jnp.asarray(chunk, jnp.int32))
    return a, jnp.where(end > start, cdiv(end, chunk), a)


def _kernel(
    x_ref,
    values_ref,
    bitmap_ref,
    offsets_ref,
    o_ref,
    x_smem,
    words_smem,
    ring_smem,
    staging_smem,
    table_smem,
    o_smem,
    table_barrier,
    reduce_barrier,
    step_loaded,
    step_consumed,
    chunk_loaded,
    chunk_consumed,
    *,
    reduce: bool,
    tiles_per_split: int,
    k_tiles: int,
    block_m: int,
    num_slots: int,
    interpret: bool,
    decode_strategy: str,
    compute_wgs: int,
    chunk: int,
    bulk_values: bool,
):
    n_tile = lax.axis_index("n_tiles")
    split = lax.axis_index("k_splits")
    m_tile = lax.axis_index("m_tiles")
    wg = lax.axis_index("wg")
    lo = split * tiles_per_split
    hi = jnp.minimum(lo + tiles_per_split, k_tiles)
    first_tile = n_tile * k_tiles + lo  # global index of step ``lo``'s tile
    ring_chunks = ring_smem.shape[0]

    def start_of(step):
        return table_smem[step - lo, 0]

    def end_of(step):  # The next tile's start (past the last tile: its end).
        return table_smem[step - lo + 1, 0]

    @pl.when(wg == compute_wgs)
    def _memory():
        # One loop feeds both rings, tile by tile (a separate warpgroup for the
        # values would need a fourth CPU thread in GPU interpret mode).
        plgpu.set_max_registers(_mgpu.MEMORY_WG_REGISTERS, action="decrease")
        plgpu.copy_gmem_to_smem(
            offsets_ref.at[pl.ds(first_tile, tiles_per_split + 1)], table_smem, table_barrier.at[0]
        )
        plgpu.barrier_wait(table_barrier.at[0])
        rows = pl.ds(m_tile * block_m, block_m)

        def tile_step(step, carry):
            g_hi, q = carry
            slot = _mgpu.slot_of(step, lo, num_slots)

            @pl.when(step - lo >= num_slots)
            def _():
                plgpu.barrier_wait(step_consumed[0].at[slot])
                plgpu.barrier_wait(step_consumed[1].at[slot])

            plgpu.copy_gmem_to_smem(
                x_ref.at[rows, pl.ds(step * TILE, TILE)], x_smem.at[slot], step_loaded[0].at[slot]
            )
            plgpu.copy_gmem_to_smem(
                bitmap_ref.at[n_tile, step], words_smem.at[slot], step_loaded[1].at[slot]
            )
            n_new, g_hi_new = _chunk_range(start_of(step), end_of(step), g_hi, chunk)
            first = g_hi_new - n_new

            def issue(i, q):
                chunk_slot = lax.rem(q, ring_chunks)

                @pl.when(q >= ring_chunks)
                def _():
                    plgpu.barrier_wait(chunk_consumed.at[chunk_slot])

                base = (first + i) * chunk
                if bulk_values:  # one cp.async.bulk, clamped at the array's end
                    plgpu.copy_gmem_to_smem(
                        values_ref.at[pl.ds(base, chunk)],
                        ring_smem.at[chunk_slot],
                        chunk_loaded.at[chunk_slot],
                        oob_mode=plgpu.OOBFillMode.UNDEFINED,
                    )
                else:  # 256-value boxes (zero-filled past the end), one arrival each
                    for j in range(chunk // TMA_BOX):
                        plgpu.copy_gmem_to_smem(
                            values_ref.at[pl.ds(base + j * TMA_BOX, TMA_BOX)],
                            ring_smem.at[chunk_slot, pl.ds(j * TMA_BOX, TMA_BOX)],
                            chunk_loaded.at[chunk_slot],
                        )
                return q + 1

            return g_hi_new, lax.fori_loop(0, n_new, issue, q)

        zero = jnp.int32(0)
        _, issued = lax.fori_loop(lo, hi, tile_step, (zero, zero))

        # Observe the last releases too (interpret mode checks every phase).
        @pl.loop(jnp.maximum(hi - num_slots, lo), hi)
        def _drain_steps(step):
            slot = _mgpu.slot_of(step, lo, num_slots)
            plgpu.barrier_wait(step_consumed[0].at[slot])
            plgpu.barrier_wait(step_consumed[1].at[slot])

        @pl.loop(jnp.maximum(issued - ring_chunks, 0), issued)
        def _drain_chunks(q):
            plgpu.barrier_wait(chunk_consumed.at[lax.rem(q, ring_chunks)])

    @pl.when(wg < compute_wgs)
    def _compute():
        # Warpgroup w decodes tiles lo + w, lo + w + compute_wgs, ... Fetched
        # chunks are consecutive weight chunks from g0 on (a CTA's nonzeros are
        # contiguous), so chunk g is the (g - g0)-th fetched. Every decoding
        # warpgroup waits for every chunk in order and releases each once
        # (chunk_consumed counts one arrival per warpgroup), only after it has
        # seen the chunk arrive: a release must not run ahead of the phase it
        # belongs to.
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        plgpu.barrier_wait(table_barrier.at[0])
        staging = staging_smem.at[wg]
        g0 = lax.div(start_of(lo), jnp.int32(chunk))
        cta_end = end_of(hi - 1)
        total = jnp.where(cta_end > start_of(lo), cdiv(cta_end, chunk) - g0, 0)

        def wait_loaded(q_from, q_to):
            @pl.loop(q_from, q_to)
            def _(q):
                plgpu.barrier_wait(chunk_loaded.at[lax.rem(q, ring_chunks)])

            return jnp.maximum(q_from, q_to)

        def release(q_from, q_to):
            @pl.loop(q_from, q_to)
            def _(q):
                plgpu.barrier_arrive(chunk_consumed.at[lax.rem(q, ring_chunks)])

            return jnp.maximum(q_from, q_to)

        def decode(slot, warp_starts):
            if interpret:
                tile = decode_tile_reference(
                    words_smem[slot],
                    ring_smem[...].reshape(-1),
                    jnp.stack(warp_starts),
                    staging.dtype,
                    decode_strategy,
                )
                staging[...] = tile
                return
            splat = plgpu.Layout.WG_SPLAT(())
            plgpu.inline_mgpu(
                arg_types=(
                    plgpu.RefType(),
                    plgpu.RefType(),
                    plgpu.RefType(transforms=_mgpu.smem_transforms(staging.dtype, TILE)),
                    (splat,) * 4,
                ),
            )(functools.partial(_mlir_decode, strategy=decode_strategy))(
                words_smem.at[slot], ring_smem, staging, tuple(warp_starts)
            )

        def step(i, carry):
            acc, q_loaded, q_released = carry
            s = lo + wg + i * compute_wgs
            slot = _mgpu.slot_of(s, lo, num_slots)
            plgpu.barrier_wait(step_loaded[0].at[slot])
            plgpu.barrier_wait(step_loaded[1].at[slot])
            a, b = _tile_chunks(start_of(s), end_of(s), chunk)
            # Chunks before this tile's first belong to tiles already fetched:
            # see them arrive and release them before waiting for this tile's.
            q_loaded = wait_loaded(q_loaded, a - g0)
            q_released = release(q_released, a - g0)
            q_loaded = wait_loaded(q_loaded, b - g0)
            # Ring index of the value at weight position p: p - g0 chunk (mod ring).
            shift = -g0 * chunk
            decode(slot, [table_smem[s - lo, w] + shift for w in range(4)])
            plgpu.commit_smem()  # The decoded tile must be visible to wgmma.
            block = mma(staging, x_smem.at[slot].T, (TILE, block_m))
            plgpu.barrier_arrive(step_consumed[0].at[slot])
            plgpu.barrier_arrive(step_consumed[1].at[slot])
            # Release what this warpgroup's next tile does not start in.
            mine_next = s + compute_wgs
            a_next = jnp.where(
                mine_next < hi,
                lax.div(start_of(jnp.minimum(mine_next, hi - 1)), jnp.int32(chunk)) - g0,
                total,
            )
            q_released = release(q_released, jnp.minimum(a_next, q_loaded))
            return acc + block, q_loaded, q_released

        zero = jnp.int32(0)
        mine = jnp.maximum(cdiv(jnp.maximum(hi - lo - wg, 0), compute_wgs), 0)
        acc, q_loaded, q_released = lax.fori_loop(
            0, mine, step, (_mgpu.zeros((TILE, block_m)), zero, zero)
        )
        # Chunks of the other warpgroup's last tiles.
        wait_loaded(q_loaded, total)
        release(q_released, total)

        if compute_wgs == 1:
            o_smem[...] = acc
        else:  # Warpgroup 1 hands its sum to 0 through shared memory.

            @pl.when(wg == 1)
            def _():
                o_smem[...] = acc
                plgpu.barrier_arrive(reduce_barrier.at[0])

            @pl.when(wg == 0)
            def _():
                plgpu.barrier_wait(reduce_barrier.at[0])
                o_smem[...] = acc + plgpu.load(o_smem, layout=plgpu.Layout.WGMMA)

        @pl.when(wg == 0)
        def _():
            plgpu.commit_smem()
            tile = (pl.ds(n_tile * TILE, TILE), pl.ds(m_tile * block_m, block_m))
            _mgpu.store_output_tile(o_smem, o_ref, split, tile, reduce)


def offsets_table(w) -> jax.Array:
    """int32 ``[tiles + 1, 4]``: each tile's quarter offsets (tile-major), then
    a row holding the last tile's end. That end is not ``len(values)``: values
    may be zero-padded past it (tensor-parallel shards share one padded
    length), and fetching the padding as part of the last tile could overrun
    the values ring."""
    last_count = jnp.sum(lax.population_count(w.bitmap[-1, -1]).astype(jnp.int32))
    end = w.tile_offsets[-1, -1, 0] + last_count
    tiles = w.tile_offsets.reshape(-1, 4)
    return jnp.concatenate([tiles, jnp.broadcast_to(end, (1, 4)).astype(jnp.int32)])


def k_splits(config: SpmmConfig, w, m: int, reduction: str) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` of the kernel for ``m`` tokens and ``w``."""
    n_tiles, k_tiles = w.bitmap.shape[:2]
    block_m = config.block_m_for(m)
    mp = -(-m // block_m) * block_m
    weight_bytes = sum(a.size * a.dtype.itemsize for a in (w.values, w.bitmap, w.tile_offsets))
    # "tma_add": no partials, so their bytes do not limit the splits.
    split_bytes = n_tiles * TILE * mp * 4 if reduction == "partials" else 0
    splits = config.splits_for(n_tiles * (mp // block_m), k_tiles, split_bytes, weight_bytes)
    tiles_per_split = cdiv(k_tiles, splits)
    return cdiv(k_tiles, tiles_per_split), tiles_per_split


def matmul(x, w, *, config: SpmmConfig | None = None):
    """x ``[M, Kp]`` (bf16/fp16) @ sparse ``w`` -> fp32 ``[M, Np]``."""
    config = config or SpmmConfig()
    reduction = _mgpu.split_k_reduction_for(config.split_k_reduction)
    m, kp = x.shape
    n_tiles, k_tiles = w.bitmap.shape[:2]
    if kp != k_tiles * TILE:
        raise ValueError(f"x {x.shape} must be padded to the weight's {k_tiles * TILE} inputs")
    block_m = config.block_m_for(m)
    mp = -(-m // block_m) * block_m
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    values = w.values
    density = values.shape[0] / (n_tiles * k_tiles * TILE * TILE)
    chunk, compute_wgs = config.value_chunk, config.compute_warpgroups
    ring_chunks = config.ring_values_for(values.dtype.itemsize) // chunk
    if values.shape[0] < chunk:  # A copy may not exceed its array.
        values = jnp.pad(values, (0, chunk - values.shape[0]))
    # A bulk copy clamped at the end of the values must stay a multiple of 16
    # bytes; otherwise a chunk is several TMA boxes, each arriving on its barrier
    # (value_chunk=256 is one box, as before issue 13).
    bulk_values = chunk > TMA_BOX and values.shape[0] * values.dtype.itemsize % 16 == 0
    splits, tiles_per_split = k_splits(config, w, m, reduction)
    # A short last split's table copy reads past the end: TMA zero-fills it (unused).
    offsets = offsets_table(w)
    num_slots = config.max_concurrent_steps
    kernel = functools.partial(
        _kernel,
        reduce=splits > 1 and reduction == "tma_add",
        tiles_per_split=tiles_per_split,
        k_tiles=k_tiles,
        block_m=block_m,
        num_slots=num_slots,
        interpret=_mgpu.interpreting(),
        decode_strategy=config.decode_for(density),
        compute_wgs=compute_wgs,
        chunk=chunk,
        bulk_values=bulk_values,
    )
    buffers = (
        plgpu.SMEM(
            (num_slots, block_m, TILE), x.dtype, transforms=_mgpu.smem_transforms(x.dtype, TILE)
        ),
        plgpu.SMEM((num_slots, WORDS), jnp.uint32),
        plgpu.SMEM((ring_chunks, chunk), values.dtype),
        plgpu.SMEM(
            (compute_wgs, TILE, TILE), x.dtype, transforms=_mgpu.smem_transforms(x.dtype, TILE)
        ),
        plgpu.SMEM((tiles_per_split + 1, 4), jnp.int32),
        plgpu.SMEM((TILE, block_m), jnp.float32),
    )
    smem = sum(math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in buffers)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"SpmmConfig(block_m={block_m}, max_concurrent_steps={num_slots}, "
            f"ring_values={ring_chunks * chunk}) with "
            f"{values.dtype} values needs ~{smem // 1024} KiB of shared memory, more than "
            f"the {SMEM_BYTES // 1024} KiB of an H100: lower block_m, max_concurrent_steps or "
            "ring_values"
        )
    loaded, consumed = _mgpu.ring_barriers(num_slots, 2, 1)
    kernel_with = lambda out_type: plgpu.kernel(  # noqa: E731
        kernel,
        out_type=out_type,
        scratch_types=(
            *buffers,
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=1),  # warpgroup 1's sum is in o_smem
            loaded,
            consumed,
            plgpu.Barrier(
                num_arrivals=1 if bulk_values else chunk // TMA_BOX,
                num_barriers=ring_chunks,
            ),
            plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=ring_chunks),
        ),
        grid=(n_tiles, splits, mp // block_m),
        grid_names=("n_tiles", "k_splits", "m_tiles"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    y_t = _mgpu.split_k_output(
        kernel_with,
        (x, values, w.bitmap, offsets),
        splits=splits,
        shape=(n_tiles * TILE, mp),
        reduction=reduction,
    )
    return y_t.T[:m]
