"""Windowed FlashAttention backward at head_dim 256 for Hopper (Pallas Mosaic GPU).

The hd <= 128 kernels of :mod:`pallax.pallas_kernels.attention_mgpu` give each
compute warpgroup its own key (dK/dV) or query (dQ) tile. At head_dim 256 that
does not fit: one warpgroup holding dK and dV for 64 keys needs 2 x 128 fp32
registers per thread (cap 232), and two warpgroups' K/V tiles plus the Q/dO
ring need ~257 KiB of SMEM (limit 227 KiB). Here both compute warpgroups of a
CTA work on the *same* 64 keys (dK/dV) or 64 queries (dQ) and split the **head
dimension**: warpgroup ``w`` owns columns ``[128 w, 128 w + 128)`` of the
gradient it accumulates. Every 256-wide operand lives in SMEM as two 128-wide
column halves (``[2, rows, 128]``, one TMA copy per half), so a product that
contracts over head_dim is two wgmmas into one accumulator and a product that
produces one half of head_dim reads one half tile. The only cross-warpgroup
synchronisation is one barrier after the loop: the shared K/V (dK/dV) or Q
(dQ) half tiles are reused to stage the outputs once neither warpgroup reads
them any more.

Why each warpgroup recomputes S and dP in full (contracting over all 256 of
head_dim) rather than splitting them by query (or key) halves and exchanging
P/dS through SMEM: per step of ``bq`` queries x ``bk`` keys, a "GEMM unit"
being ``bq x bk x 256`` MACs, the useful work is 4 units in dK/dV (S^T, dP^T,
dV, dK) and 3 in dQ (S, dP, dQ); recomputing S and dP in both warpgroups
executes 6 units in dK/dV (1.5x) and 5 in dQ (1.67x): 11 per tile pair where
the hd <= 128 kernels execute 7 and a fused FA3-style backward 5.
The exchange would avoid that, but P^T/dS^T then cross warpgroups, so the
second GEMM of each pair must read its A operand from SMEM (no register A
operands, no in-place accumulation), every step needs fenced stores and two
cross-warpgroup barrier round trips on the critical path, and S^T/dP^T shrink
to N = 32 wgmmas, which read more operand bytes per FLOP. Counting the SMEM
that wgmma operands and TMA move per dK/dV step (64 x 64, the CTA): here
2 x (64+64 KiB for S^T, dP^T + 16+16 KiB for the dO/Q halves) + 64 KiB of
Q/dO loads = 384 KiB, 3072 clk at 128 B/clk against 3072 clk of MMA; with
the exchange 368 KiB (2944 clk) against 2048 clk of MMA: bound by the same
SMEM bandwidth to within 5%, plus the synchronisation. So we take the
redundant, synchronisation-free structure: each warpgroup's step is exactly
the hd-128 kernel's step (register A operands on the GPU, one wgmma wait per
GEMM pair) with S/dP contracting over 256 instead of 128. Predicted costs:
``benchmarks/RESULTS.md`` ("attention backward at head_dim 256").

Budgets (predictions from tile arithmetic, as in ``attention_mgpu``; a
``R x C`` fp32 tile held by one warpgroup costs ``R * C / 128`` registers per
thread, a 16-bit one half that; cap 232; 227 KiB of SMEM per CTA). With
``bq = block_q_bwd``, ``bk = block_kv_bwd`` (64 and 64 for head_dim 256) and
2 ring slots:

* dK/dV: dK and dV halves ``bk * 128 / 128`` each + S^T/P^T and dP^T/dS^T
  ``bk * bq / 128`` each + the 16-bit P^T/dS^T: 64+64+32+32+16 = ~210
  (the hd-128 kernel's figure). SMEM: K and V ``bk * 256 * 2`` B each (32 KiB),
  Q/dO ring ``slots * bq * 256 * 2`` B each (64 KiB), lse/delta ring 1 KiB:
  193 KiB; the ``"smem"`` path adds P^T/dS^T staging ``2 * bk * bq * 2`` B:
  209 KiB.
* dQ: dQ half ``bq * 128 / 128`` + S/P and dP ``bq * bk / 128`` each + 16-bit
  dS: 64+32+32+16 = ~145. SMEM: Q and dO 32 KiB each, K/V ring 64 KiB each,
  lse/delta 1 KiB: 193 KiB; 209 KiB with the dS staging tiles.

:func:`check_config` refuses tile sizes whose SMEM would not fit, naming the
fields, before anything is traced.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallax.pallas_kernels import _mgpu
from pallax.pallas_kernels._mgpu import Stream, floordiv, zeros
from pallax.pallas_kernels.attention_mgpu import (
    NUM_COMPUTE_WGS,
    AttentionConfig,
    Window,
    _accumulate,
    _block_range,
    _softmax_delta,
    _softmax_grads,
    _staging_tile,
    _take_from_ring,
    _unmasked_kv_blocks,
    _unmasked_q_blocks,
    _warp_specialized_kernel,
)

HEAD_DIM = 256
HALF = HEAD_DIM // NUM_COMPUTE_WGS  # head-dim columns owned by one warpgroup
SMEM_LIMIT_BYTES = 227 * 1024


def smem_bytes(config: AttentionConfig, dtype, p_operand: str) -> dict[str, int]:
    """Predicted dynamic SMEM of the dQ and dK/dV kernels (barriers aside)."""
    itemsize = jnp.dtype(dtype).itemsize
    bq, bk, slots = config.block_q_bwd, config.block_kv_bwd, config.max_concurrent_steps_bwd
    staging = 0 if p_operand == "registers" else NUM_COMPUTE_WGS * bq * bk * itemsize
    dq = (
        2 * bq * HEAD_DIM * itemsize  # Q and dO
        + 2 * slots * bk * HEAD_DIM * itemsize  # K and V rings
        + 2 * NUM_COMPUTE_WGS * bq * 4  # lse and delta, one copy per warpgroup
        + staging
    )
    dkv = (
        2 * bk * HEAD_DIM * itemsize  # K and V
        + 2 * slots * bq * HEAD_DIM * itemsize  # Q and dO rings
        + 2 * slots * bq * 4  # lse and delta rings
        + staging
    )
    return {"dQ": dq, "dK/dV": dkv}


def check_config(config: AttentionConfig, dtype, p_operand: str) -> None:
    """Raises ``ValueError`` naming the backward tile fields if a kernel's SMEM
    would exceed the H100's 227 KiB."""
    for kernel, used in smem_bytes(config, dtype, p_operand).items():
        if used > SMEM_LIMIT_BYTES:
            raise ValueError(
                f"AttentionConfig(block_q_bwd={config.block_q_bwd}, "
                f"block_kv_bwd={config.block_kv_bwd}, "
                f"max_concurrent_steps_bwd={config.max_concurrent_steps_bwd}) needs "
                f"{used / 1024:.0f} KiB of shared memory in the head_dim-{HEAD_DIM} "
                f"{kernel} backward kernel (p_operand={p_operand!r}; limit "
                f"{SMEM_LIMIT_BYTES // 1024} KiB); use AttentionConfig.for_head_dim({HEAD_DIM})"
            )


def _split_k_pair(first, second):
    """Two independent products, each ``sum_h a_h @ b_h`` over head-dim halves
    (``(pairs, out_shape)`` each, SMEM operands), issued back to back into fresh
    fp32 accumulators and awaited together (one wgmma wait)."""
    (pairs0, shape0), (pairs1, shape1) = first, second

    def body(acc0, acc1):
        for a, b in pairs0:
            plgpu.wgmma(acc0, a, b)
        for a, b in pairs1:
            plgpu.wgmma(acc1, a, b)
        return acc0[...], acc1[...]

    return pl.run_scoped(body, plgpu.ACC(shape0, jnp.float32), plgpu.ACC(shape1, jnp.float32))


def _sync_compute_wgs(barrier):
    """Both compute warpgroups have finished reading the shared tiles."""
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    q_smem,
    do_smem,
    row_smem,
    k_smem,
    v_smem,
    ds_smem2,
    own_barriers,
    loaded,
    consumed,
    done,
    *,
    window: Window,
    config: AttentionConfig,
    scale: float,
    group: int,
    logits_soft_cap: float | None,
):
    """dQ for ``block_q`` query rows of one head; warpgroup ``w`` owns dQ's column
    half ``w``. Per KV step: S = Q K^T and dP = dO V^T over all of head_dim (two
    wgmmas each, one wait), then dQ[:, half] += dS K[:, half].

    SMEM: ``q_smem``/``do_smem`` ``[2 halves, bq, 128]``; ``k_smem``/``v_smem``
    ``[2 halves, slots, bk, 128]``; ``row_smem`` ``[lse/delta, wg, bq]``.
    """
    block_q, block_kv = config.block_q_bwd, config.block_kv_bwd
    num_slots = config.max_concurrent_steps_bwd
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    q_start = lax.axis_index("q_tiles") * block_q
    rows = pl.ds(q_start, block_q)
    lo, hi = _block_range(*window.key_range(q_start, block_q), block_kv)
    k_loaded, v_loaded = loaded[:2], loaded[2:]
    k_consumed, v_consumed = consumed[:2], consumed[2:]
    dtype = q_ref.dtype
    grads_of = dict(window=window, scale=scale, logits_soft_cap=logits_soft_cap)

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        ds_smem = None if ds_smem2 is None else ds_smem2.at[wg]  # None: registers
        cols = pl.ds(wg * HALF, HALF)
        lse_smem, delta_smem = row_smem.at[0, wg], row_smem.at[1, wg]
        # Each warpgroup loads its half of Q and dO (both read both halves) and
        # its own copy of the row statistics.
        copies = [
            (q_ref.at[batch, rows, head, cols], q_smem.at[wg]),
            (do_ref.at[batch, rows, head, cols], do_smem.at[wg]),
            (lse_ref.at[batch, head, rows], lse_smem),
            (delta_ref.at[batch, head, rows], delta_smem),
        ]
        for i, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, own_barriers.at[i * NUM_COMPUTE_WGS + wg])
        for h in range(NUM_COMPUTE_WGS):  # both halves of Q and dO
            plgpu.barrier_wait(own_barriers.at[h])
            plgpu.barrier_wait(own_barriers.at[NUM_COMPUTE_WGS + h])
        plgpu.barrier_wait(own_barriers.at[2 * NUM_COMPUTE_WGS + wg])
        plgpu.barrier_wait(own_barriers.at[3 * NUM_COMPUTE_WGS + wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        lse = plgpu.load(lse_smem, layout=row_layout)
        delta = plgpu.load(delta_smem, layout=row_layout)
        full_lo, full_hi = _unmasked_kv_blocks(window, q_start, block_q, block_kv, lo, hi)
        halves = range(NUM_COMPUTE_WGS)

        def step(kv_step, dq, masked):
            slot = _mgpu.slot_of(kv_step, lo, num_slots)
            for barrier in (*k_loaded, *v_loaded):
                plgpu.barrier_wait(barrier.at[slot])
            s, dp = _split_k_pair(
                ([(q_smem.at[h], k_smem.at[h, slot].T) for h in halves], (block_q, block_kv)),
                ([(do_smem.at[h], v_smem.at[h, slot].T) for h in halves], (block_q, block_kv)),
            )
            for barrier in v_consumed:
                plgpu.barrier_arrive(barrier.at[slot])
            mask_at = (q_start, kv_step * block_kv) if masked else None
            _, ds = _softmax_grads(s, dp, lse, delta, **grads_of, mask_at=mask_at)
            (dq,) = _accumulate((dq,), ((ds, k_smem.at[wg, slot]),), staging_smem=ds_smem)
            for barrier in k_consumed:
                plgpu.barrier_arrive(barrier.at[slot])
            return dq

        dq = _mgpu.three_phase_loop(lo, full_lo, full_hi, hi, step, zeros((block_q, HALF)))
        _sync_compute_wgs(done)  # the other warpgroup no longer reads our Q half
        q_smem.at[wg][...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[batch, rows, head, cols])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        kv_head = floordiv(head, group)

        def half_block(ref, h):
            return lambda step: ref.at[
                batch, pl.ds(step * block_kv, block_kv), kv_head, pl.ds(h * HALF, HALF)
            ]

        streams = [
            Stream(half_block(ref, h), smem.at[h], ld, cs)
            for ref, smem, lds, css in ((k_ref, k_smem, k_loaded, k_consumed),
                                        (v_ref, v_smem, v_loaded, v_consumed))
            for h, ld, cs in zip(range(NUM_COMPUTE_WGS), lds, css, strict=True)
        ]  # fmt: skip
        _mgpu.produce(streams, lo, hi, num_slots)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    k_smem,
    v_smem,
    q_smem,
    do_smem,
    lse_smem,
    delta_smem,
    t_smem2,
    own_barriers,
    loaded,
    consumed,
    done,
    *,
    window: Window,
    config: AttentionConfig,
    scale: float,
    group: int,
    logits_soft_cap: float | None,
):
    """dK and dV for ``block_kv`` keys of one kv head (all its query heads);
    warpgroup ``w`` owns column half ``w`` of both. Per query step: S^T = K Q^T and
    dP^T = V dO^T over all of head_dim (two wgmmas each, one wait), then
    dV[:, half] += P^T dO[:, half] and dK[:, half] += dS^T Q[:, half] as a second
    group (register A operands, in place; or SMEM-staged).

    SMEM: ``k_smem``/``v_smem`` ``[2 halves, bk, 128]``; ``q_smem``/``do_smem``
    ``[2 halves, slots, bq, 128]``; lse/delta rings ``[slots, bq]``.
    """
    block_q, block_kv = config.block_q_bwd, config.block_kv_bwd
    num_slots = config.max_concurrent_steps_bwd
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("kv_heads")
    wg = lax.axis_index("wg")
    k_start = lax.axis_index("kv_tiles") * block_kv
    keys = pl.ds(k_start, block_kv)
    q_lo, q_hi = _block_range(*window.query_range(k_start, block_kv), block_q)
    # Steps enumerate (query head in group, query block) pairs, head-major.
    q_blocks = q_hi - q_lo
    num_steps = q_blocks * group
    dtype = q_ref.dtype
    grads_of = dict(window=window, scale=scale, logits_soft_cap=logits_soft_cap)
    halves = range(NUM_COMPUTE_WGS)
    q_loaded, do_loaded, (lse_loaded,), (delta_loaded,) = (
        loaded[:2], loaded[2:4], loaded[4:5], loaded[5:]
    )  # fmt: skip
    q_consumed, do_consumed, (lse_consumed,), (delta_consumed,) = (
        consumed[:2], consumed[2:4], consumed[4:5], consumed[5:]
    )  # fmt: skip

    def head_and_block(step):
        local_head = lax.div(step, jnp.maximum(q_blocks, 1))
        return kv_head * group + local_head, q_lo + step - local_head * q_blocks

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        t_smem = None if t_smem2 is None else t_smem2.at[wg]  # None: registers
        cols = pl.ds(wg * HALF, HALF)
        # Each warpgroup loads its half of K and V; both read both halves.
        plgpu.copy_gmem_to_smem(
            k_ref.at[batch, keys, kv_head, cols], k_smem.at[wg], own_barriers.at[wg]
        )
        plgpu.copy_gmem_to_smem(
            v_ref.at[batch, keys, kv_head, cols],
            v_smem.at[wg],
            own_barriers.at[NUM_COMPUTE_WGS + wg],
        )
        for i in range(2 * NUM_COMPUTE_WGS):
            plgpu.barrier_wait(own_barriers.at[i])
        full_lo, full_hi = _unmasked_q_blocks(window, k_start, block_kv, block_q, q_lo, q_hi)
        col_layout = plgpu.Layout.WGMMA.reduce(0)

        def step(linear_step, q_block, carry, masked):
            dk, dv = carry
            slot = _mgpu.slot_of(linear_step, 0, num_slots)
            for barrier in (*q_loaded, *do_loaded):
                plgpu.barrier_wait(barrier.at[slot])
            s_t, dp_t = _split_k_pair(
                ([(k_smem.at[h], q_smem.at[h, slot].T) for h in halves], (block_kv, block_q)),
                ([(v_smem.at[h], do_smem.at[h, slot].T) for h in halves], (block_kv, block_q)),
            )
            lse = _take_from_ring(lse_smem, lse_loaded, lse_consumed, slot, col_layout)
            delta = _take_from_ring(delta_smem, delta_loaded, delta_consumed, slot, col_layout)
            mask_at = (q_block * block_q, k_start) if masked else None
            p_t, ds_t = _softmax_grads(
                s_t, dp_t, lse, delta, **grads_of, mask_at=mask_at, transposed=True
            )
            dv, dk = _accumulate(
                (dv, dk),
                ((p_t, do_smem.at[wg, slot]), (ds_t, q_smem.at[wg, slot])),
                staging_smem=t_smem,
            )
            for barrier in (*do_consumed, *q_consumed):
                plgpu.barrier_arrive(barrier.at[slot])
            return dk, dv

        def head_loop(local_head, carry):
            base = local_head * q_blocks - q_lo  # linear step = base + q_block

            def phase(lo_, hi_, masked, carry):
                return lax.fori_loop(lo_, hi_, lambda qb, c: step(base + qb, qb, c, masked), carry)

            carry = phase(q_lo, full_lo, True, carry)
            carry = phase(full_lo, full_hi, False, carry)
            return phase(full_hi, q_hi, True, carry)

        init = (zeros((block_kv, HALF)), zeros((block_kv, HALF)))
        dk, dv = lax.fori_loop(0, group, head_loop, init)
        _sync_compute_wgs(done)  # the other warpgroup no longer reads our K/V halves
        k_smem.at[wg][...] = (dk * scale).astype(dtype)
        v_smem.at[wg][...] = dv.astype(dtype)
        plgpu.commit_smem()
        out = (batch, keys, kv_head, cols)
        plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[out], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[out], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        def rows_of(ref, h):
            def source(step):
                head, q_block = head_and_block(step)
                return ref.at[batch, pl.ds(q_block * block_q, block_q), head, pl.ds(h * HALF, HALF)]

            return source

        def stats_of(ref):
            def source(step):
                head, q_block = head_and_block(step)
                return ref.at[batch, head, pl.ds(q_block * block_q, block_q)]

            return source

        streams = [
            Stream(rows_of(ref, h), smem.at[h], lds[h], css[h])
            for ref, smem, lds, css in ((q_ref, q_smem, q_loaded, q_consumed),
                                        (do_ref, do_smem, do_loaded, do_consumed))
            for h in halves
        ]  # fmt: skip
        streams += [
            Stream(stats_of(lse_ref), lse_smem, lse_loaded, lse_consumed),
            Stream(stats_of(delta_ref), delta_smem, delta_loaded, delta_consumed),
        ]
        _mgpu.produce(streams, 0, num_steps, num_slots)


def backward(
    q,
    k,
    v,
    out,
    lse,
    do,
    *,
    window: Window,
    scale: float,
    config: AttentionConfig,
    logits_soft_cap: float | None = None,
):
    """Padded inputs with head_dim 256 -> (dq, dk, dv) in the input dtypes.

    Shapes as :func:`attention_mgpu.backward`: q/out/do ``[B, Tp, H, 256]``,
    k/v ``[B, Sp, K, 256]``, lse ``[B, H, Tp]`` (base 2); ``Tp`` a multiple of
    ``block_q_bwd`` and ``Sp`` of ``block_kv_bwd``.
    """
    batch, q_pad, num_heads, head_dim = q.shape
    _, kv_pad, num_kv_heads, _ = k.shape
    if head_dim != HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} (query shape {q.shape}): this backward is for 256")
    dtype = q.dtype
    block_q, block_kv = config.block_q_bwd, config.block_kv_bwd
    assert q_pad % block_q == 0 and kv_pad % block_kv == 0
    p_operand = config.resolved_p_operand()
    check_config(config, dtype, p_operand)
    num_slots = config.max_concurrent_steps_bwd
    transforms = _mgpu.smem_transforms(dtype)
    delta = _softmax_delta(out, do)
    common = dict(
        window=window,
        config=config,
        scale=scale,
        group=num_heads // num_kv_heads,
        logits_soft_cap=logits_soft_cap,
    )
    halves = lambda *shape: plgpu.SMEM(  # noqa: E731
        (NUM_COMPUTE_WGS, *shape, HALF), dtype, transforms=transforms
    )
    staging = functools.partial(_staging_tile, p_operand, dtype=dtype)
    done = plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS)

    dq = _warp_specialized_kernel(
        functools.partial(_dq_kernel, **common),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=(
            halves(block_q),
            halves(block_q),
            plgpu.SMEM((2, NUM_COMPUTE_WGS, block_q), jnp.float32),
            halves(num_slots, block_kv),
            halves(num_slots, block_kv),
            staging(block_q, block_kv),
            plgpu.Barrier(num_barriers=4 * NUM_COMPUTE_WGS),
            *_mgpu.ring_barriers(num_slots, 2 * NUM_COMPUTE_WGS, NUM_COMPUTE_WGS),
            done,
        ),
        grid=(num_heads, q_pad // block_q, batch),
        grid_names=("heads", "q_tiles", "batch"),
    )(q, k, v, do, lse, delta)

    dk, dv = _warp_specialized_kernel(
        functools.partial(_dkv_kernel, **common),
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=(
            halves(block_kv),
            halves(block_kv),
            halves(num_slots, block_q),
            halves(num_slots, block_q),
            plgpu.SMEM((num_slots, block_q), jnp.float32),
            plgpu.SMEM((num_slots, block_q), jnp.float32),
            staging(block_kv, block_q),
            plgpu.Barrier(num_barriers=2 * NUM_COMPUTE_WGS),
            *_mgpu.ring_barriers(num_slots, 2 * NUM_COMPUTE_WGS + 2, NUM_COMPUTE_WGS),
            done,
        ),
        grid=(num_kv_heads, kv_pad // block_kv, batch),
        grid_names=("kv_heads", "kv_tiles", "batch"),
    )(q, k, v, do, lse, delta)
    return dq, dk, dv
