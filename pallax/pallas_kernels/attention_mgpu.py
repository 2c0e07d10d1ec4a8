"""Windowed FlashAttention forward and backward for Hopper (Pallas Mosaic GPU).

Mask semantics are those of ``jax.nn.dot_product_attention``: query ``i`` may
attend key ``j`` iff ``i - left <= j <= i + right`` and ``j < kv_len``
(``is_causal`` is ``right = 0``; no window is ``left = right = infinity``,
represented by any value >= ``q_len + kv_len``).

Work is proportional to ``seq x window``: every CTA computes the range of key
blocks (forward, dQ) or query blocks (dK/dV) that intersect its window and the
memory warpgroup only streams those. Within that range, blocks entirely inside
the window take an unmasked fast path.

Layouts: q/o ``[batch, q_len, q_heads, head_dim]``, k/v
``[batch, kv_len, kv_heads, head_dim]``; the log-sum-exp residual is base 2 of
the scaled (and soft-capped) logits, ``[batch, q_heads, q_len]``.

Logit soft-capping (Gemma 2): with ``logits_soft_cap = c`` the logits are
``c * tanh(scale * q.k / c)`` before masking and softmax; the backward passes
multiply dS by ``1 - tanh^2``. Fully masked rows produce zeros
and ``lse = +inf`` (so the backward pass gives them zero gradient).

Inputs must already be padded to the tile multiples (the wrapper in
:mod:`pallax.pallas_kernels.attention` does this); ``q_len``/``kv_len`` are the
unpadded lengths used for masking.

Operand placement (``AttentionConfig.p_operand``): on the GPU the second GEMM
of each pair takes its A operand (P, dS, P^T, dS^T) from registers and
accumulates in place, as FlashAttention-3 and jax's ``attention_mgpu.py`` do;
GPU interpret mode cannot run that, so it (and anyone who asks) gets the older
path that stages the operand in SMEM and adds a fresh accumulator.

Budgets below are predictions from tile arithmetic, not ptxas or profiler
output (no GPU run exists yet): a ``R x C`` fp32 tile held by one warpgroup
costs ``R * C / 128`` registers per thread, a 16-bit one half that; compute
warpgroups may use 232 registers (``set_max_registers``), the memory one 40;
an H100 CTA may use 227 KiB of SMEM.
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
from pallax.pallas_kernels._mgpu import (
    Stream,
    cdiv,
    clamp,
    floordiv,
    mma,
    mma_from_registers,
    zeros,
)

NUM_COMPUTE_WGS = 2  # Two consumer warpgroups per CTA, ping-ponged as in FA3.
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_BACKWARD_HEAD_DIM = 256  # 256: attention_backward_wide_mgpu (head-dim split).


P_OPERANDS = ("registers", "smem")
DQ_MODES = ("fused", "separate")
MAX_FUSED_DQ_HEAD_DIM = 128  # The fused dK/dV/dQ tiles are sized for head_dim <= 128.
SMEM_BYTES = 227 * 1024  # per CTA on sm_90


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and operand placement. Rows per CTA are ``2 * block_q`` (one
    block per compute wg).

    ``p_operand`` says where the softmax-side A operand of the second GEMM of
    each pair lives (P in ``P @ V``; dS in ``dS @ K``; P^T and dS^T in the
    dK/dV kernel):

    * ``"registers"``: wgmma reads it straight from registers (as FA3 and jax's
      ``attention_mgpu.py``) and accumulates in place (``pl.run_state``), with
      the wait for the next K block issued while that wgmma runs.
    * ``"smem"``: it is stored to a shared-memory staging tile, fenced, and
      multiplied into a fresh accumulator that is then added. GPU interpret mode
      (the CPU tests) supports only this path: it has no register A operands
      and no ``run_state`` accumulators.
    * ``None`` (default): ``"registers"`` when compiling for a GPU, ``"smem"``
      in GPU interpret mode.

    ``dq_mode`` says how the backward pass computes dQ:

    * ``"fused"``: the dK/dV kernel also multiplies its dS by its own keys and
      adds the fp32 ``[block_q_bwd, head_dim]`` partial into a GMEM accumulator
      with a TMA add-reduction (FlashAttention-2/3's dQ accumulation): 5 GEMMs
      per (query block, key block) pair instead of 7. The adds land in whatever
      order the CTAs reach them, so dQ is not bitwise reproducible run to run
      (fp32 addition is not associative); dK and dV are.
    * ``"separate"``: a second kernel recomputes S and dP per query tile and
      accumulates dQ in registers: deterministic, two more GEMMs per pair.
    * ``None`` (default): ``"fused"`` where it can run (head_dim <= 128, its
      tiles fit shared memory, and TMA reductions exist: on a GPU, or in GPU
      interpret mode with :mod:`pallax.testing` imported), else ``"separate"``.
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    max_concurrent_steps_bwd: int = 2
    p_operand: str | None = None
    dq_mode: str | None = None

    def __post_init__(self):
        if self.p_operand is not None and self.p_operand not in P_OPERANDS:
            raise ValueError(f"p_operand={self.p_operand!r} must be one of {P_OPERANDS} or None")
        if self.dq_mode is not None and self.dq_mode not in DQ_MODES:
            raise ValueError(f"dq_mode={self.dq_mode!r} must be one of {DQ_MODES} or None")
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value <= 0 or value % 64:
                raise ValueError(f"{name}={value} must be a positive multiple of 64")
        for name in ("max_concurrent_steps", "max_concurrent_steps_bwd"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 2")

    @staticmethod
    def for_head_dim(head_dim: int) -> AttentionConfig:
        """Heuristic tiles that fit shared memory and registers on H100.

        head_dim 64 takes 128-row query steps in the backward (FA3's 128 x 128
        hd-64 tile: 128 keys per CTA, 128 queries per step), which halves the
        wgmma waits per FLOP; at head_dim 128 the dK/dV accumulators leave no
        registers for that (S^T and dP^T would need 64 more each). head_dim 256
        keeps 64 x 64 backward tiles and 2 slots, the only ones whose SMEM fits
        the head-dim-split kernels (``attention_backward_wide_mgpu``).
        """
        if head_dim > 128:
            return AttentionConfig(block_kv=64)
        if head_dim <= 64:
            return AttentionConfig(block_q_bwd=128)
        return AttentionConfig()

    def resolved_p_operand(self) -> str:
        """``p_operand`` for the kernel being traced now (see the class docstring)."""
        interpreting = _mgpu.interpreting()
        if self.p_operand is None:
            return "smem" if interpreting else "registers"
        if self.p_operand == "registers" and interpreting:
            raise ValueError(
                "AttentionConfig(p_operand='registers') cannot run in GPU interpret mode "
                "(no register A operands or run_state accumulators there); use "
                "p_operand='smem' or None"
            )
        return self.p_operand

    def resolved_dq_mode(self, head_dim: int, dtype) -> str:
        """``dq_mode`` for the backward pass being traced now (see the class docstring)."""
        obstacle = self._fused_dq_obstacle(head_dim, dtype)
        if self.dq_mode is None:
            return "separate" if obstacle else "fused"
        if self.dq_mode == "fused" and obstacle:
            raise ValueError(
                f"AttentionConfig(dq_mode='fused') cannot run: {obstacle}; "
                "use dq_mode='separate' or None"
            )
        return self.dq_mode

    def _fused_dq_obstacle(self, head_dim: int, dtype) -> str | None:
        if head_dim > MAX_FUSED_DQ_HEAD_DIM:
            return f"head_dim {head_dim} > {MAX_FUSED_DQ_HEAD_DIM}"
        if not _mgpu.tma_reductions_available():
            return (
                "GPU interpret mode without simulated TMA reductions "
                "(import pallax.testing to add them)"
            )
        smem = dkv_smem_bytes(self, head_dim, dtype, self.resolved_p_operand(), fuse_dq=True)
        if smem > SMEM_BYTES:
            return (
                f"its dK/dV/dQ kernel needs ~{smem // 1024} KiB of shared memory at head_dim "
                f"{head_dim} (block_q_bwd={self.block_q_bwd}, block_kv_bwd="
                f"{self.block_kv_bwd}, max_concurrent_steps_bwd="
                f"{self.max_concurrent_steps_bwd}), more than the {SMEM_BYTES // 1024} KiB of "
                "an H100"
            )
        return None

    @property
    def q_rows_per_cta(self) -> int:
        return NUM_COMPUTE_WGS * self.block_q

    @property
    def q_multiple(self) -> int:
        """q_len must be padded to this (forward and backward tiles)."""
        import math

        return math.lcm(NUM_COMPUTE_WGS * self.block_q, self.block_q_bwd * NUM_COMPUTE_WGS)

    @property
    def kv_multiple(self) -> int:
        import math

        return math.lcm(self.block_kv, NUM_COMPUTE_WGS * self.block_kv_bwd)


@dataclasses.dataclass(frozen=True)
class Window:
    """Static mask geometry: key ``j`` is visible to query ``i`` iff
    ``i - left <= j <= i + right``, ``j < kv_len``."""

    left: int
    right: int
    q_len: int
    kv_len: int

    def key_range(self, q_start, num_rows):
        """Keys ``[lo, hi)`` that rows ``[q_start, q_start + num_rows)`` may see."""
        lo = jnp.maximum(q_start - self.left, 0)
        hi = jnp.minimum(q_start + num_rows + self.right, self.kv_len)
        return lo, jnp.maximum(hi, lo)

    def query_range(self, k_start, num_keys):
        """Queries ``[lo, hi)`` (unpadded) that see keys ``[k_start, k_start + num_keys)``."""
        lo = jnp.maximum(k_start - self.right, 0)
        hi = jnp.minimum(k_start + num_keys + self.left, self.q_len)
        return lo, jnp.maximum(hi, lo)

    def mask(self, q_ids, k_ids):
        d = k_ids - q_ids
        return (d >= -self.left) & (d <= self.right) & (k_ids < self.kv_len)


def _block_range(lo, hi, block: int):
    """Blocks of size ``block`` covering element range ``[lo, hi)``."""
    first = floordiv(lo, block)
    return first, jnp.maximum(cdiv(hi, block), first)


def _unmasked_kv_blocks(window: Window, q_start, block_q: int, block_kv: int, lo, hi):
    """KV blocks in ``[lo, hi)`` that every row of ``[q_start, q_start+block_q)`` sees fully."""
    first = cdiv(jnp.maximum(q_start + block_q - 1 - window.left, 0), block_kv)
    last = floordiv(
        jnp.minimum(jnp.maximum(q_start + window.right + 1, 0), window.kv_len), block_kv
    )
    first = clamp(first, lo, hi)
    return first, clamp(last, first, hi)


def _unmasked_q_blocks(window: Window, k_start, block_kv: int, block_q: int, lo, hi):
    """Q blocks in ``[lo, hi)`` whose rows all see keys ``[k_start, k_start+block_kv)``."""
    first = cdiv(jnp.maximum(k_start + block_kv - 1 - window.right, 0), block_q)
    last = floordiv(jnp.maximum(k_start + 1 + window.left, 0), block_q)
    # A key block reaching into the kv padding always needs the mask.
    last = jnp.where(k_start + block_kv <= window.kv_len, last, first)
    first = clamp(first, lo, hi)
    return first, clamp(last, first, hi)


def _apply_mask(window: Window, s, q_start, k_start, transposed: bool = False):
    rows, cols = s.shape
    row_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
    col_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
    if transposed:  # rows are keys, columns are queries
        mask = window.mask(col_ids + q_start, row_ids + k_start)
    else:
        mask = window.mask(row_ids + q_start, col_ids + k_start)
    return jnp.where(mask, s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _InSmem:
    """An A operand already stored (and fenced) in shared memory: wgmma reads the ref."""

    ref: object


def _softmax_grads(s, dp, lse, delta, *, window, scale, logits_soft_cap, mask_at, transposed=False):
    """P and dS of one tile from its raw logits ``s = q.k`` and ``dp = dO.v``.

    ``lse`` and ``delta`` hold one value per query: per row, or per column with
    ``transposed`` (the dK/dV kernels' tiles, rows = keys). ``mask_at``:
    ``(q_start, k_start)`` of the tile when the window mask applies, else None.
    dS is ``P * (dP - delta)``, times ``1 - tanh^2`` under a soft cap.
    """
    s, squashed = _mgpu.base2_logits(s, scale, logits_soft_cap)
    if mask_at is not None:
        s = _apply_mask(window, s, *mask_at, transposed=transposed)
    query_axis = 1 if transposed else 0
    p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [query_axis]))
    ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [query_axis]))
    return p, _mgpu.soft_cap_grad(ds, squashed)


def _take_from_ring(smem, loaded, consumed, slot, layout):
    """Waits for ``smem[slot]``, loads it into registers and releases the slot."""
    plgpu.barrier_wait(loaded.at[slot])
    value = plgpu.load(smem.at[slot], layout=layout)
    plgpu.barrier_arrive(consumed.at[slot])
    return value


def _accumulate(accs, products, staging_smem=None, while_in_flight=None):
    """``acc + a @ b`` for each ``acc`` of ``accs`` and ``(a, b)`` of ``products``, on
    the tensor cores; each ``a`` a register array or an :class:`_InSmem` ref, each
    ``b`` an SMEM ref. An ``acc`` of ``None`` is a fresh zero accumulator.

    Without ``staging_smem`` (``p_operand="registers"``) every register ``a`` goes
    to wgmma as a register A operand (cast to ``b``'s 16-bit dtype); all products
    are issued back to back, accumulate in place, and are awaited once on return.
    ``while_in_flight()`` is traced after they are issued, so it runs while the
    tensor cores work. With ``staging_smem`` (``"smem"``) each register ``a`` in
    turn is stored and fenced there and a fresh accumulator is added, the path
    GPU interpret mode runs. Returns the tuple of updated accumulators.
    """

    def operand_rows(a):
        return (a.ref if isinstance(a, _InSmem) else a).shape[0]

    shapes = [(operand_rows(a), b.shape[-1]) for a, b in products]
    if staging_smem is None:

        def body(acc_refs):
            for acc_ref, (a, b) in zip(acc_refs, products, strict=True):
                plgpu.wgmma(acc_ref, a.ref if isinstance(a, _InSmem) else a.astype(b.dtype), b)
            if while_in_flight is not None:
                while_in_flight()

        init = tuple(
            plgpu.ACC.init(zeros(shape) if acc is None else acc)
            for acc, shape in zip(accs, shapes, strict=True)
        )
        return pl.run_state(body)(init)
    results = []
    for acc, (a, b), shape in zip(accs, products, shapes, strict=True):
        if isinstance(a, _InSmem):
            product = mma(a.ref, b, shape)
        else:
            product = mma_from_registers(a, staging_smem, b, shape)
        results.append(product if acc is None else acc + product)
    if while_in_flight is not None:
        while_in_flight()
    return tuple(results)


def _mma_pair(first, second):
    """Two independent ``a @ b`` (SMEM operands, ``(a, b, out_shape)`` each) issued
    back to back into fresh fp32 accumulators and awaited together: one wgmma
    wait instead of two, and the second product overlaps the first's tail."""
    (a0, b0, shape0), (a1, b1, shape1) = first, second

    def body(acc0, acc1):
        plgpu.wgmma(acc0, a0, b0)
        plgpu.wgmma(acc1, a1, b1)
        return acc0[...], acc1[...]

    return pl.run_scoped(body, plgpu.ACC(shape0, jnp.float32), plgpu.ACC(shape1, jnp.float32))


def _warp_specialized_kernel(body, **kwargs):
    """``plgpu.kernel`` with the CTA every kernel here uses: ``NUM_COMPUTE_WGS``
    compute warpgroups and one memory warpgroup (thread axis ``"wg"``), with
    approximate exp2/tanh."""
    return plgpu.kernel(
        body,
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )


def _staging_tile(p_operand: str, rows: int, cols: int, dtype):
    """Per-warpgroup SMEM tile for an A operand computed in registers (P, dS, P^T,
    dS^T), needed only on the ``"smem"`` path; None (allocates nothing) otherwise."""
    if p_operand == "registers":
        return None
    return plgpu.SMEM((NUM_COMPUTE_WGS, rows, cols), dtype, transforms=_mgpu.smem_transforms(dtype))


def _softmax_delta(out, do):
    """``delta_i = sum_d o_id * do_id``, fp32 ``[B, H, T]`` (the layout of lse)."""
    return jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    q_smem2,
    k_smem,
    v_smem,
    lse_smem2,
    p_smem2,
    q_barriers,
    loaded,
    consumed,
    schedule_barrier,
    *,
    window: Window,
    config: AttentionConfig,
    scale: float,
    group: int,
    logits_soft_cap: float | None,
):
    """One CTA: ``2 * block_q`` query rows of one head, two compute warpgroups
    ping-ponged (one runs softmax while the other's QK^T is on the tensor cores)
    and one TMA warpgroup streaming K/V blocks through ``max_concurrent_steps``
    slots.

    Registers per compute thread (block_q 64; block_kv 128, or 64 at hd 256),
    live at the softmax: O accumulator ``hd/2`` + S ``block_kv/2`` + P in 16
    bits ``block_kv/4`` + row statistics, i.e. 32+64+32 (hd 64), 64+64+32 (hd
    128), 128+32+16 (hd 256). That is jax's kernel's set; masking adds only
    iota/compare temporaries, so the ``"registers"`` path is predicted within
    ~16 registers of jax's. The ``"smem"`` path also holds a fresh ``P @ V``
    accumulator beside O during the add: +32/+64/+128, so at hd 256 it needs
    ~256 > 232 and is predicted to spill.

    SMEM: Q/O tiles ``2*block_q*hd*2`` B + K/V ring ``2*slots*block_kv*hd*2``
    B + lse 512 B, plus on the ``"smem"`` path a P tile ``2*block_q*block_kv*2``
    B: hd 64: 80.5 KiB (112.5 with P staging); hd 128: 160.5 (192.5); hd 256:
    192.5 (208.5).
    """
    block_q, block_kv = config.block_q, config.block_kv
    num_slots = config.max_concurrent_steps
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_q_start = lax.axis_index("q_tiles") * config.q_rows_per_cta
    lo, hi = _block_range(*window.key_range(cta_q_start, config.q_rows_per_cta), block_kv)
    k_loaded, v_loaded = loaded
    k_consumed, v_consumed = consumed
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]

    def schedule():
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(schedule_barrier)

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        q_start = cta_q_start + wg * block_q
        plgpu.copy_gmem_to_smem(
            q_ref.at[batch, pl.ds(q_start, block_q), head], q_smem, q_barriers.at[wg]
        )
        plgpu.barrier_wait(q_barriers.at[wg])
        full_lo, full_hi = _unmasked_kv_blocks(window, q_start, block_q, block_kv, lo, hi)
        in_registers = p_smem2 is None
        if in_registers:  # Each step waits for the next K inside its P @ V (below).
            pl.when(lo < hi)(lambda: plgpu.barrier_wait(k_loaded.at[0]))

        def step(kv_step, carry, masked):
            acc, m_i, l_i = carry
            slot = _mgpu.slot_of(kv_step, lo, num_slots)
            if not in_registers:
                plgpu.barrier_wait(k_loaded.at[slot])

            def qk_body(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                schedule()  # Let the other warpgroup run its softmax meanwhile.
                return acc_ref[...]

            s = pl.run_scoped(qk_body, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            s, _ = _mgpu.base2_logits(s, scale, logits_soft_cap)
            if masked:
                s = _apply_mask(window, s, q_start, kv_step * block_kv)
            p, m_new, l_i, acc = _mgpu.softmax_step(s, m_i, l_i, acc)
            if in_registers:
                p = p.astype(dtype)
                if head_dim <= 128:
                    # As jax's kernel: finish the softmax (and free its fp32
                    # temporaries) before the barriers, not after them.
                    acc, m_new, l_i, p = lax.optimization_barrier((acc, m_new, l_i, p))
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_wait(schedule_barrier)

            def wait_next_k():
                next_step = kv_step + 1
                next_slot = _mgpu.slot_of(next_step, lo, num_slots)
                pl.when(next_step < hi)(lambda: plgpu.barrier_wait(k_loaded.at[next_slot]))

            (acc,) = _accumulate(
                (acc,),
                ((p, v_smem.at[slot]),),
                staging_smem=None if in_registers else p_smem2.at[wg],
                while_in_flight=wait_next_k if in_registers else None,
            )
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l_i

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        carry = (
            zeros((block_q, head_dim)),
            zeros((block_q,), row_layout, -jnp.inf),
            zeros((block_q,), row_layout),
        )
        pl.when(wg == 1)(schedule)
        acc, m_i, l_i = _mgpu.three_phase_loop(lo, full_lo, full_hi, hi, step, carry)
        pl.when(wg == 0)(schedule)

        out, lse = _mgpu.softmax_finish(acc, m_i, l_i, empty_lse=jnp.inf)
        q_smem[...] = out.astype(dtype)
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q_start, block_q), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        _mgpu.produce_kv(
            k_ref,
            v_ref,
            k_smem,
            v_smem,
            loaded,
            consumed,
            batch=batch,
            kv_head=floordiv(head, group),
            block_kv=block_kv,
            lo=lo,
            hi=hi,
            num_slots=num_slots,
        )


def forward(
    q,
    k,
    v,
    *,
    window: Window,
    scale: float,
    config: AttentionConfig,
    logits_soft_cap: float | None = None,
):
    """Padded inputs -> (out ``[B, Tp, H, D]``, lse ``[B, H, Tp]`` base-2)."""
    batch, q_pad, num_heads, head_dim = q.shape
    _, kv_pad, num_kv_heads, _ = k.shape
    assert q_pad % config.q_rows_per_cta == 0 and kv_pad % config.block_kv == 0
    dtype = q.dtype
    num_slots = config.max_concurrent_steps
    transforms = _mgpu.smem_transforms(dtype)
    p_operand = config.resolved_p_operand()
    kernel = functools.partial(
        _forward_kernel,
        window=window,
        config=config,
        scale=scale,
        group=num_heads // num_kv_heads,
        logits_soft_cap=logits_soft_cap,
    )
    return _warp_specialized_kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((NUM_COMPUTE_WGS, config.block_q, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((num_slots, config.block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((num_slots, config.block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((NUM_COMPUTE_WGS, config.block_q), jnp.float32),
            _staging_tile(p_operand, config.block_q, config.block_kv, dtype),  # P
            plgpu.Barrier(num_barriers=NUM_COMPUTE_WGS),
            *_mgpu.ring_barriers(num_slots, 2, NUM_COMPUTE_WGS),
            plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),
        ),
        grid=(num_heads, q_pad // config.q_rows_per_cta, batch),
        grid_names=("heads", "q_tiles", "batch"),
    )(q, k, v)


# ----------------------------------------------------------------------------
# Backward: dQ (one CTA per query tile) and dK/dV (one CTA per key tile per kv
# head, looping over the query heads of its group, so GQA needs no reduction).
# ----------------------------------------------------------------------------


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    q_smem2,
    do_smem2,
    row_smem2,
    k_smem,
    v_smem,
    ds_smem2,
    own_barriers,
    loaded,
    consumed,
    *,
    window: Window,
    config: AttentionConfig,
    scale: float,
    group: int,
    logits_soft_cap: float | None,
):
    """dQ for ``2 * block_q`` query rows of one head (S and dP recomputed).

    Per KV step: S = Q K^T and dP = dO V^T as one wgmma group (one wait), then
    dQ += dS K with dS as the A operand (registers, in place; or SMEM-staged).

    Registers per compute thread (``bq = block_q_bwd`` rows per warpgroup,
    ``bk = block_kv_bwd``): dQ accumulator ``bq*hd/128`` + S/P and dP fp32
    ``bq*bk/128`` each (they die into dS) + dS in 16 bits half that. hd 128
    (64 x 64): 64+32+32+16 = ~150; hd 64 (128 x 64): 64+64+64+32 = ~200 at the
    dS step. The ``"smem"`` path adds a fresh dQ-sized accumulator (+64).

    SMEM: Q and dO tiles ``2*bq*hd*2`` B each, lse/delta ``2*2*bq*4`` B, K/V
    ring ``2*slots*bk*hd*2`` B, plus a dS staging tile ``2*bq*bk*2`` B on the
    ``"smem"`` path: hd 64: 98 KiB (130); hd 128: 129 KiB (145).
    """
    block_q, block_kv = config.block_q_bwd, config.block_kv_bwd
    num_slots = config.max_concurrent_steps_bwd
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_q_start = lax.axis_index("q_tiles") * (NUM_COMPUTE_WGS * block_q)
    lo, hi = _block_range(*window.key_range(cta_q_start, NUM_COMPUTE_WGS * block_q), block_kv)
    k_loaded, v_loaded = loaded
    k_consumed, v_consumed = consumed
    dtype = q_ref.dtype
    grads_of = dict(window=window, scale=scale, logits_soft_cap=logits_soft_cap)
    head_dim = q_ref.shape[-1]

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        ds_smem = None if ds_smem2 is None else ds_smem2.at[wg]  # None: registers
        lse_smem, delta_smem = row_smem2.at[0, wg], row_smem2.at[1, wg]
        q_start = cta_q_start + wg * block_q
        rows = pl.ds(q_start, block_q)
        copies = [
            (q_ref.at[batch, rows, head], q_smem),
            (do_ref.at[batch, rows, head], do_smem),
            (lse_ref.at[batch, head, rows], lse_smem),
            (delta_ref.at[batch, head, rows], delta_smem),
        ]
        for i, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, own_barriers.at[i * NUM_COMPUTE_WGS + wg])
        for i in range(len(copies)):
            plgpu.barrier_wait(own_barriers.at[i * NUM_COMPUTE_WGS + wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        lse = plgpu.load(lse_smem, layout=row_layout)
        delta = plgpu.load(delta_smem, layout=row_layout)
        full_lo, full_hi = _unmasked_kv_blocks(window, q_start, block_q, block_kv, lo, hi)

        def step(kv_step, dq, masked):
            slot = _mgpu.slot_of(kv_step, lo, num_slots)
            plgpu.barrier_wait(k_loaded.at[slot])
            plgpu.barrier_wait(v_loaded.at[slot])
            s, dp = _mma_pair(
                (q_smem, k_smem.at[slot].T, (block_q, block_kv)),
                (do_smem, v_smem.at[slot].T, (block_q, block_kv)),
            )
            plgpu.barrier_arrive(v_consumed.at[slot])
            mask_at = (q_start, kv_step * block_kv) if masked else None
            _, ds = _softmax_grads(s, dp, lse, delta, **grads_of, mask_at=mask_at)
            (dq,) = _accumulate((dq,), ((ds, k_smem.at[slot]),), staging_smem=ds_smem)
            plgpu.barrier_arrive(k_consumed.at[slot])
            return dq

        dq = _mgpu.three_phase_loop(lo, full_lo, full_hi, hi, step, zeros((block_q, head_dim)))
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        _mgpu.produce_kv(
            k_ref,
            v_ref,
            k_smem,
            v_smem,
            loaded,
            consumed,
            batch=batch,
            kv_head=floordiv(head, group),
            block_kv=block_kv,
            lo=lo,
            hi=hi,
            num_slots=num_slots,
        )


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    window: Window,
    config: AttentionConfig,
    scale: float,
    group: int,
    logits_soft_cap: float | None,
    fuse_dq: bool,
):
    """dK and dV for ``2 * block_kv`` keys of one kv head (all its query heads),
    and with ``fuse_dq`` these keys' share of dQ.

    ``refs``: ``dq_acc_ref`` (``fuse_dq`` only: fp32 ``[B, Tq_pad, H, D]``,
    zero-initialised, added into), ``dk_ref``, ``dv_ref``, then the scratch of
    :func:`backward` (the dS^T and dQ staging tiles are None without ``fuse_dq``).

    Per query step: S^T = K Q^T and dP^T = V dO^T as one wgmma group, then
    dV += P^T dO and dK += dS^T Q as a second group with register A operands
    accumulated in place: two waits per step (the ``"smem"`` path stages P^T
    and dS^T one after the other: three waits and two fenced stores).

    With ``fuse_dq``, dS^T is stored (16-bit) to a staging tile and the second
    group becomes dV += P^T dO (P^T from registers), dK += dS^T Q and a fresh
    ``dQ_part = dS K_wg`` (``[bq, hd]`` fp32; dS is the staged dS^T read
    transposed as wgmma's A operand, which 16-bit types allow), still one wait.
    ``dQ_part`` goes to an fp32 SMEM tile (after the previous step's reduction
    has read it: ``wait_smem_to_gmem(0, wait_read_only=True)``, a whole step
    later, so free) and a TMA ``add`` reduction sends it into ``dq_acc``; the
    caller scales and casts ``dq_acc`` in XLA. Both warpgroups and all CTAs of
    the query block's window add into the same rows (L2 atomics, any order).

    Registers per compute thread (``bk = block_kv_bwd`` keys per warpgroup,
    ``bq = block_q_bwd`` queries per step): dK and dV accumulators
    ``bk*hd/128`` each + S^T/P^T and dP^T/dS^T fp32 ``bk*bq/128`` each + the
    16-bit P^T and dS^T half that each. hd 128 (64 x 64): 64+64+32+32+16 =
    ~210, close to the 232 cap; hd 64 (64 x 128): 32+32+64+64+32 = ~220. The
    ``"smem"`` path adds a fresh dK/dV-sized accumulator (~274 at hd 128,
    predicted to spill). ``fuse_dq`` adds the transient dQ_part ``bq*hd/128``
    (64 at both head dims), live only in the second group, once S^T/dP^T
    (fp32) and dS^T (now read from SMEM) are dead: dK + dV + P^T (16-bit) +
    dQ_part = 64+64+16+64 = ~208 at hd 128, 32+32+32+64 = ~160 at hd 64, below
    the softmax-time peaks above.

    SMEM (:func:`dkv_smem_bytes`): the CTA's K and V tiles ``2*bk*hd*2`` B each,
    Q/dO ring ``2*slots*bq*hd*2`` B, lse/delta ring ``2*slots*bq*4`` B, plus a
    P^T/dS^T staging tile ``2*bk*bq*2`` B on the ``"smem"`` path: hd 64: 98 KiB
    (130); hd 128: 129 KiB (145). ``fuse_dq`` adds the fp32 dQ staging tiles
    ``2*bq*hd*4`` B (64 KiB at both) and, on the ``"registers"`` path, a dS^T
    tile ``2*bk*bq*2`` B (the ``"smem"`` path reuses its staging tile): hd 64:
    194 KiB (194); hd 128: 210 KiB (210), under 227. hd 256 would need 257 KiB
    even without dQ: it runs the head-dim-split kernels of
    :mod:`pallax.pallas_kernels.attention_backward_wide_mgpu` instead.
    """
    if fuse_dq:
        dq_acc_ref, *refs = refs
    else:
        dq_acc_ref = None
    (
        dk_ref,
        dv_ref,
        k_smem2,
        v_smem2,
        q_smem,
        do_smem,
        lse_smem,
        delta_smem,
        t_smem2,
        ds_smem2,
        dq_smem2,
        own_barriers,
        loaded,
        consumed,
    ) = refs
    block_q, block_kv = config.block_q_bwd, config.block_kv_bwd
    num_slots = config.max_concurrent_steps_bwd
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("kv_heads")
    wg = lax.axis_index("wg")
    cta_k_start = lax.axis_index("kv_tiles") * (NUM_COMPUTE_WGS * block_kv)
    q_lo, q_hi = _block_range(*window.query_range(cta_k_start, NUM_COMPUTE_WGS * block_kv), block_q)
    # Steps enumerate (query head in group, query block) pairs, head-major.
    q_blocks = q_hi - q_lo
    num_steps = q_blocks * group
    dtype = q_ref.dtype
    grads_of = dict(window=window, scale=scale, logits_soft_cap=logits_soft_cap)
    head_dim = q_ref.shape[-1]

    def head_and_block(step):
        local_head = lax.div(step, jnp.maximum(q_blocks, 1))
        return kv_head * group + local_head, q_lo + step - local_head * q_blocks

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(_mgpu.COMPUTE_WG_REGISTERS, action="increase")
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        t_smem = None if t_smem2 is None else t_smem2.at[wg]  # None: registers
        if fuse_dq:
            dq_smem = dq_smem2.at[wg]
            ds_t_smem = t_smem if ds_smem2 is None else ds_smem2.at[wg]
        k_start = cta_k_start + wg * block_kv
        keys = pl.ds(k_start, block_kv)
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem, own_barriers.at[wg])
        plgpu.copy_gmem_to_smem(
            v_ref.at[batch, keys, kv_head], v_smem, own_barriers.at[NUM_COMPUTE_WGS + wg]
        )
        plgpu.barrier_wait(own_barriers.at[wg])
        plgpu.barrier_wait(own_barriers.at[NUM_COMPUTE_WGS + wg])
        full_lo, full_hi = _unmasked_q_blocks(window, k_start, block_kv, block_q, q_lo, q_hi)
        q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
        q_consumed, do_consumed, lse_consumed, delta_consumed = consumed
        col_layout = plgpu.Layout.WGMMA.reduce(0)

        def step(linear_step, head, q_block, carry, masked):
            dk, dv = carry
            slot = _mgpu.slot_of(linear_step, 0, num_slots)
            plgpu.barrier_wait(q_loaded.at[slot])
            plgpu.barrier_wait(do_loaded.at[slot])
            s_t, dp_t = _mma_pair(
                (k_smem, q_smem.at[slot].T, (block_kv, block_q)),
                (v_smem, do_smem.at[slot].T, (block_kv, block_q)),
            )
            lse = _take_from_ring(lse_smem, lse_loaded, lse_consumed, slot, col_layout)
            delta = _take_from_ring(delta_smem, delta_loaded, delta_consumed, slot, col_layout)
            mask_at = (q_block * block_q, k_start) if masked else None
            p_t, ds_t = _softmax_grads(
                s_t, dp_t, lse, delta, **grads_of, mask_at=mask_at, transposed=True
            )
            if not fuse_dq:
                # dV and dK: on the register path both wgmmas go out together, one wait.
                dv, dk = _accumulate(
                    (dv, dk),
                    ((p_t, do_smem.at[slot]), (ds_t, q_smem.at[slot])),
                    staging_smem=t_smem,
                )
            else:
                if t_smem is not None:  # "smem": P^T first, then dS^T in the same tile.
                    (dv,) = _accumulate((dv,), ((p_t, do_smem.at[slot]),), staging_smem=t_smem)
                ds_t_smem[...] = ds_t.astype(dtype)
                plgpu.commit_smem()  # Make the generic-proxy stores visible to wgmma.
                products = ((_InSmem(ds_t_smem), q_smem.at[slot]), (_InSmem(ds_t_smem.T), k_smem))
                if t_smem is None:  # "registers": one group for dV, dK and dQ.
                    dv, dk, dq_part = _accumulate(
                        (dv, dk, None), ((p_t, do_smem.at[slot]), *products)
                    )
                else:
                    dk, dq_part = _accumulate((dk, None), products, staging_smem=t_smem)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last step's add read dq_smem
                dq_smem[...] = dq_part
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    dq_smem,
                    dq_acc_ref.at[batch, pl.ds(q_block * block_q, block_q), head],
                    reduction_op="add",
                )
            plgpu.barrier_arrive(do_consumed.at[slot])
            plgpu.barrier_arrive(q_consumed.at[slot])
            return dk, dv

        def head_loop(local_head, carry):
            base = local_head * q_blocks - q_lo  # linear step = base + q_block
            head = kv_head * group + local_head

            def phase(lo_, hi_, masked, carry):
                return lax.fori_loop(
                    lo_, hi_, lambda qb, c: step(base + qb, head, qb, c, masked), carry
                )

            carry = phase(q_lo, full_lo, True, carry)
            carry = phase(full_lo, full_hi, False, carry)
            return phase(full_hi, q_hi, True, carry)

        init = (zeros((block_kv, head_dim)), zeros((block_kv, head_dim)))
        dk, dv = lax.fori_loop(0, group, head_loop, init)
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, kv_head], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, kv_head], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)  # dK, dV and every dQ reduction

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        def rows_of(ref):
            def source(step):
                head, q_block = head_and_block(step)
                return ref.at[batch, pl.ds(q_block * block_q, block_q), head]

            return source

        def stats_of(ref):
            def source(step):
                head, q_block = head_and_block(step)
                return ref.at[batch, head, pl.ds(q_block * block_q, block_q)]

            return source

        smems = (q_smem, do_smem, lse_smem, delta_smem)
        sources = (rows_of(q_ref), rows_of(do_ref), stats_of(lse_ref), stats_of(delta_ref))
        streams = [
            Stream(src, smem, ld, cs)
            for src, smem, ld, cs in zip(sources, smems, loaded, consumed, strict=True)
        ]
        _mgpu.produce(streams, 0, num_steps, num_slots)


def dkv_smem_bytes(
    config: AttentionConfig, head_dim: int, dtype, p_operand: str, fuse_dq: bool
) -> int:
    """Shared memory of one dK/dV CTA (see :func:`_dkv_kernel`), barriers included."""
    itemsize = jnp.dtype(dtype).itemsize
    bq, bk, slots = config.block_q_bwd, config.block_kv_bwd, config.max_concurrent_steps_bwd
    staging = NUM_COMPUTE_WGS * bk * bq * itemsize
    buffers = [
        NUM_COMPUTE_WGS * bk * head_dim * itemsize,  # K tiles
        NUM_COMPUTE_WGS * bk * head_dim * itemsize,  # V tiles
        slots * bq * head_dim * itemsize,  # Q ring
        slots * bq * head_dim * itemsize,  # dO ring
        slots * bq * 4,  # lse ring
        slots * bq * 4,  # delta ring
    ]
    if p_operand == "smem":
        buffers.append(staging)  # P^T / dS^T
    if fuse_dq:
        buffers.append(NUM_COMPUTE_WGS * bq * head_dim * 4)  # fp32 dQ partials
        if p_operand == "registers":
            buffers.append(staging)  # dS^T
    # Mosaic aligns each buffer to 1 KiB (swizzled tiles need it); 8 B per barrier.
    return sum(-(-n // 1024) * 1024 for n in buffers) + 8 * (2 * NUM_COMPUTE_WGS + 8 * slots)


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
    """Padded inputs -> (dq, dk, dv) in the input dtypes."""
    batch, q_pad, num_heads, head_dim = q.shape
    _, kv_pad, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    dtype = q.dtype
    block_q, block_kv = config.block_q_bwd, config.block_kv_bwd
    assert q_pad % (NUM_COMPUTE_WGS * block_q) == 0
    assert kv_pad % (NUM_COMPUTE_WGS * block_kv) == 0
    num_slots = config.max_concurrent_steps_bwd
    transforms = _mgpu.smem_transforms(dtype)
    delta = _softmax_delta(out, do)
    common = dict(
        window=window, config=config, scale=scale, group=group, logits_soft_cap=logits_soft_cap
    )
    row_tile = lambda rows: plgpu.SMEM(  # noqa: E731
        (NUM_COMPUTE_WGS, rows, head_dim), dtype, transforms=transforms
    )
    # Staging tiles (ds in dQ; p^T then ds^T in dK/dV) on the "smem" path only.
    p_operand = config.resolved_p_operand()
    staging = functools.partial(_staging_tile, p_operand, dtype=dtype)
    ring_tile = lambda rows: plgpu.SMEM(  # noqa: E731
        (num_slots, rows, head_dim), dtype, transforms=transforms
    )

    fuse_dq = config.resolved_dq_mode(head_dim, dtype) == "fused"
    dkv_kernel = functools.partial(
        _warp_specialized_kernel,
        functools.partial(_dkv_kernel, fuse_dq=fuse_dq, **common),
        scratch_types=(
            row_tile(block_kv),
            row_tile(block_kv),
            ring_tile(block_q),
            ring_tile(block_q),
            plgpu.SMEM((num_slots, block_q), jnp.float32),
            plgpu.SMEM((num_slots, block_q), jnp.float32),
            staging(block_kv, block_q),
            # dS^T for dQ = dS K (the "smem" path reuses the staging tile above).
            plgpu.SMEM((NUM_COMPUTE_WGS, block_kv, block_q), dtype, transforms=transforms)
            if fuse_dq and p_operand == "registers"
            else None,
            # fp32 dQ partials on their way to the TMA add-reduction.
            plgpu.SMEM(
                (NUM_COMPUTE_WGS, block_q, head_dim),
                jnp.float32,
                transforms=_mgpu.smem_transforms(jnp.float32),
            )
            if fuse_dq
            else None,
            plgpu.Barrier(num_barriers=2 * NUM_COMPUTE_WGS),
            *_mgpu.ring_barriers(num_slots, 4, NUM_COMPUTE_WGS),
        ),
        grid_names=("kv_heads", "kv_tiles", "batch"),
    )

    def dkv(q, k, v, do, lse, delta, *dq_acc_ref):
        """dK, dV (and, given ``dq_acc_ref``, dQ added into it) for ``k.shape[0]`` batch."""
        return dkv_kernel(
            out_type=(jax.ShapeDtypeStruct(k.shape, dtype),) * 2,
            grid=(num_kv_heads, kv_pad // (NUM_COMPUTE_WGS * block_kv), k.shape[0]),
        )(q, k, v, do, lse, delta, *dq_acc_ref)

    if fuse_dq:
        # The kernel adds into dq_acc, a mutable ref (zeros, then every CTA's
        # partials); XLA then reads it once to scale and cast it: 4 B/element
        # memset + 4 B read + 2 B write. dK/dV stay kernel outputs, stored into
        # refs only to leave run_state: inside shard_map, Mosaic kernels take no
        # refs that vary over mesh axes, and a fresh zeros has no such axes.
        # Under vmap the mapped axis joins the batch (run_state cannot batch).
        @_mgpu.fold_vmap_into_batch
        def fused(q, k, v, do, lse, delta):
            def run(refs):
                dq_acc_ref, dk_ref, dv_ref = refs
                dk_ref[...], dv_ref[...] = dkv(q, k, v, do, lse, delta, dq_acc_ref)

            zeros_like = ((q, jnp.float32), (k, dtype), (v, dtype))
            return pl.run_state(run)(tuple(jnp.zeros(x.shape, t) for x, t in zeros_like))

        dq_acc, dk, dv = fused(q, k, v, do, lse, delta)
        return (dq_acc * scale).astype(dtype), dk, dv

    dq = _warp_specialized_kernel(
        functools.partial(_dq_kernel, **common),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=(
            row_tile(block_q),
            row_tile(block_q),
            plgpu.SMEM((2, NUM_COMPUTE_WGS, block_q), jnp.float32),
            ring_tile(block_kv),
            ring_tile(block_kv),
            staging(block_q, block_kv),
            plgpu.Barrier(num_barriers=4 * NUM_COMPUTE_WGS),
            *_mgpu.ring_barriers(num_slots, 2, NUM_COMPUTE_WGS),
        ),
        grid=(num_heads, q_pad // (NUM_COMPUTE_WGS * block_q), batch),
        grid_names=("heads", "q_tiles", "batch"),
    )(q, k, v, do, lse, delta)
    dk, dv = dkv(q, k, v, do, lse, delta)
    return dq, dk, dv
