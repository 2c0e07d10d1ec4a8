"""Pieces shared by pallax's Mosaic GPU kernels.

Kernels here follow one pattern (as jax's ``attention_mgpu.py``): a CTA runs
``num_compute_wgs`` compute warpgroups plus one memory warpgroup that streams
blocks through a ring of shared-memory slots with TMA. The ring is driven by
:func:`produce`, and the consumers walk the same ``[lo, hi)`` step range so
both sides agree on which slot holds which step.

Nothing here queries the device at trace time, so every kernel can be lowered
for CUDA on a CPU-only machine (see :mod:`pallax.testing`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

LOG2E = 1.4426950408889634
MEMORY_WG_REGISTERS = 40
COMPUTE_WG_REGISTERS = 232


def smem_transforms(dtype, minor_dim: int | None = None) -> tuple[Any, ...]:
    """Tiling + swizzle, the layout wgmma and TMA want for 2D operands.

    128-byte swizzle unless the minor dimension is narrower (then 64 or 32).
    """
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = 128 if minor_dim is None else min(128, minor_dim * itemsize)
    if swizzle not in (32, 64, 128):
        raise ValueError(f"minor dimension {minor_dim} of {dtype} cannot be swizzled")
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def cdiv(a, b):
    """Ceil division that works on Python ints and traced int32 scalars."""
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return lax.div(a + b - 1, jnp.asarray(b, jnp.int32))


def floordiv(a, b: int):
    """Floor division of a non-negative traced int32 scalar by a static int."""
    return lax.div(a, jnp.asarray(b, jnp.int32))


def clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def mma(a, b, shape: tuple[int, int]) -> jax.Array:
    """``a @ b`` on the tensor cores into a fresh fp32 accumulator.

    We add the result to a running accumulator in registers instead of
    accumulating in place with ``pl.run_state``: GPU interpret mode (our CPU
    test path) does not support ``run_state``, and the extra fp32 add is cheap.
    """

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_from_registers(x, staging_smem, b, shape: tuple[int, int]) -> jax.Array:
    """``x @ b`` where ``x`` is a register array, staged through shared memory.

    wgmma can read its A operand from registers on the GPU, but GPU interpret
    mode cannot, and we keep a single code path that the CPU tests exercise.
    ``staging_smem`` is reused each step; the previous wgmma reading it has
    completed because :func:`mma` waits for its result.
    """
    staging_smem[...] = x.astype(staging_smem.dtype)
    plgpu.commit_smem()  # Make the generic-proxy stores visible to wgmma.
    return mma(staging_smem, b, shape)


def zeros(shape, layout=plgpu.Layout.WGMMA, value=0.0) -> jax.Array:
    return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


@dataclasses.dataclass(frozen=True)
class Stream:
    """One operand streamed by the memory warpgroup through a ring of slots.

    ``source(step)`` returns the GMEM ref view to copy for ``step``; ``smem``
    has a leading slot dimension; ``loaded``/``consumed`` are barrier arrays
    with one barrier per slot (``consumed`` counts one arrival per compute wg).
    """

    source: Callable[[jax.Array], Any]
    smem: Any
    loaded: Any
    consumed: Any


def produce(streams: Sequence[Stream], lo, hi, num_slots: int) -> None:
    """Memory-warpgroup loop: TMA steps ``[lo, hi)`` of every stream into its ring.

    Step ``s`` lands in slot ``(s - lo) % num_slots``; the first ``num_slots``
    steps are issued at once, later ones wait for the slot to be released.
    """
    plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")

    def issue(step, slot):
        for stream in streams:
            plgpu.copy_gmem_to_smem(
                stream.source(step), stream.smem.at[slot], stream.loaded.at[slot]
            )

    for slot in range(num_slots):
        pl.when(lo + slot < hi)(lambda slot=slot: issue(lo + slot, slot))

    @pl.loop(lo + num_slots, jnp.maximum(hi, lo + num_slots))
    def _refill(step):
        slot = slot_of(step, lo, num_slots)
        for stream in streams:
            plgpu.barrier_wait(stream.consumed.at[slot])
            plgpu.copy_gmem_to_smem(
                stream.source(step), stream.smem.at[slot], stream.loaded.at[slot]
            )

    # Observe the releases of the last steps too, so every barrier phase is
    # waited on (GPU interpret mode checks this; on the GPU it is free, the
    # memory warpgroup has nothing left to do).
    @pl.loop(jnp.maximum(hi - num_slots, lo), hi)
    def _drain(step):
        for stream in streams:
            plgpu.barrier_wait(stream.consumed.at[slot_of(step, lo, num_slots)])


def produce_kv(
    k_ref,
    v_ref,
    k_smem,
    v_smem,
    loaded,
    consumed,
    *,
    batch,
    kv_head,
    block_kv: int,
    lo,
    hi,
    num_slots: int,
) -> None:
    """Streams K/V blocks ``[lo, hi)`` of ``[batch, seq, kv_heads, head_dim]`` refs."""

    def kv_block(ref):
        return lambda step: ref.at[batch, pl.ds(step * block_kv, block_kv), kv_head]

    (k_loaded, v_loaded), (k_consumed, v_consumed) = loaded, consumed
    produce(
        [
            Stream(kv_block(k_ref), k_smem, k_loaded, k_consumed),
            Stream(kv_block(v_ref), v_smem, v_loaded, v_consumed),
        ],
        lo,
        hi,
        num_slots,
    )


def base2_logits(s, scale: float, soft_cap: float | None):
    """Raw ``q . k`` -> base-2 logits (exp2 is one instruction), soft-capped if asked.

    With ``soft_cap`` the natural logits are ``cap * tanh(scale * s / cap)``;
    also returns that tanh (``None`` without a cap), whose ``1 - tanh^2`` the
    backward pass needs.
    """
    if soft_cap is None:
        return s * (scale * LOG2E), None
    squashed = jnp.tanh(s * (scale / soft_cap))
    return squashed * (soft_cap * LOG2E), squashed


def soft_cap_grad(ds, squashed):
    """dS w.r.t. the capped logits -> w.r.t. ``scale * s`` (chain rule through tanh)."""
    return ds if squashed is None else ds * (1.0 - squashed * squashed)


def softmax_step(s, m_i, l_i, acc):
    """Online-softmax update for base-2 logits ``s [rows, cols]``.

    Returns ``(p, m_new, l_new, acc_rescaled)``; the caller adds ``p @ V``.
    Rows that have seen only masked (-inf) keys keep ``m = -inf`` and are
    shifted by 0, so exp2 gives 0 instead of NaN.
    """
    m_new = jnp.maximum(m_i, s.max(axis=1))
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_i - m_shift)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_shift, s.shape, [0]))
    l_new = l_i * alpha + p.sum(axis=1)
    return p, m_new, l_new, acc * lax.broadcast_in_dim(alpha, acc.shape, [0])


def softmax_finish(acc, m_i, l_i, empty_lse: float):
    """``(acc / l, base-2 lse)``; rows without keys give 0 and ``empty_lse``."""
    empty = l_i == 0.0
    inv_l = 1.0 / jnp.where(empty, 1.0, l_i)
    out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
    return out, jnp.where(empty, empty_lse, m_i + jnp.log(l_i) * LOG2E)


def slot_of(step, lo, num_slots: int):
    return lax.rem(step - lo, jnp.asarray(num_slots, jnp.int32))


def ring_barriers(num_slots: int, num_streams: int, num_consumers: int):
    """(loaded, consumed) barrier arrays for ``num_streams`` rings."""
    loaded = tuple(plgpu.Barrier(num_barriers=num_slots) for _ in range(num_streams))
    consumed = tuple(
        plgpu.Barrier(num_arrivals=num_consumers, num_barriers=num_slots)
        for _ in range(num_streams)
    )
    return loaded, consumed


def three_phase_loop(lo, full_lo, full_hi, hi, step_fn, carry):
    """Runs ``step_fn(step, carry, masked)`` over ``[lo, hi)``.

    Steps in ``[full_lo, full_hi)`` need no mask (the block lies entirely inside
    the attention window), so they take the cheaper unmasked path.
    """
    carry = lax.fori_loop(lo, full_lo, lambda s, c: step_fn(s, c, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda s, c: step_fn(s, c, False), carry)
    return lax.fori_loop(full_hi, hi, lambda s, c: step_fn(s, c, True), carry)


def interpreting() -> bool:
    """Whether kernels traced now run in GPU interpret mode (``pallax.testing.gpu_interpret``)."""
    from jax._src import config

    return config.pallas_tpu_interpret_mode_context_manager.value is not None


# ----------------------------------------------------------------------------
# Split-K reduction
# ----------------------------------------------------------------------------

# How CTAs that share an output tile but own different K ranges combine their
# fp32 sums. "tma_add": each CTA reduce-adds its tile into one zero-initialised
# fp32 ``[rows, cols]`` accumulator with a TMA store (``cp.reduce.async.bulk``;
# the adds happen in L2), so extra splits cost no DRAM bytes, but the order of
# the fp32 adds varies run to run (results differ by rounding). "partials":
# every split writes its own ``[splits, rows, cols]`` slice and XLA sums them
# in a fixed order (bitwise reproducible; ``splits x`` the output in bytes).
SPLIT_K_REDUCTIONS = ("tma_add", "partials")


def check_split_k_reduction(value) -> None:
    if value not in (None, *SPLIT_K_REDUCTIONS):
        raise ValueError(
            f"split_k_reduction={value!r} must be one of {SPLIT_K_REDUCTIONS} or None "
            "(tma_add where available)"
        )


def tma_reductions_available() -> bool:
    """Whether ``copy_smem_to_gmem(..., reduction_op="add")`` runs where kernels are traced now.

    Always on a GPU. GPU interpret mode (jax 0.11.2) has no TMA reductions
    unless ``pallax.testing`` patched them in; we look for its marker on the
    interpreter's callback rather than import the testing module here.
    """
    if not interpreting():
        return True
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    return bool(getattr(gpu_callbacks.copy_smem_to_gmem, "_pallax_reductions", False))


def split_k_reduction_for(requested: str | None) -> str:
    """The reduction a kernel uses: ``requested``, or "tma_add" where available."""
    check_split_k_reduction(requested)
    if requested is None:
        return "tma_add" if tma_reductions_available() else "partials"
    if requested == "tma_add" and not tma_reductions_available():
        raise ValueError(
            "split_k_reduction='tma_add' needs TMA reductions, which jax's GPU interpret mode "
            "lacks unless pallax.testing is imported; use 'partials' or None"
        )
    return requested


def run_with_accumulator(
    kernel_call: Callable[..., Any], inputs: Sequence[Any], shape
) -> jax.Array:
    """``kernel_call(*inputs, acc_ref)`` on a zero-initialised fp32 ``shape`` ref; returns it.

    ``kernel_call`` is a ``plgpu.kernel(..., out_type=())`` whose CTAs
    reduce-add into ``acc_ref``; the ref is the custom call's operand and
    result (aliased), so XLA allocates it once and writes the zeros once.
    """

    def run(refs):
        (acc_ref,) = refs
        kernel_call(*inputs, acc_ref)

    return pl.run_state(run)((jnp.zeros(shape, jnp.float32),))[0]


def store_output_tile(o_smem, o_ref, split, index: tuple[Any, ...], reduce: bool) -> None:
    """Epilogue: the CTA's tile in ``o_smem`` (committed) to GMEM.

    ``o_ref`` is ``[splits, ...]`` partials (the CTA writes slice ``split``),
    or the output itself: written directly (one split) or, with ``reduce``,
    reduce-added by TMA into the shared fp32 accumulator.
    """
    if len(o_ref.shape) == len(index) + 1:
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[(split, *index)])
    else:
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[index], reduction_op="add" if reduce else None)
    plgpu.wait_smem_to_gmem(0)


def split_k_output(
    kernel_with: Callable[[Any], Callable[..., Any]],
    inputs: Sequence[Any],
    *,
    splits: int,
    shape: tuple[int, ...],
    reduction: str,
    dtype=jnp.float32,
) -> jax.Array:
    """Runs a split-K kernel and returns its summed output ``shape``.

    ``kernel_with(out_type)`` builds the ``plgpu.kernel`` for an output type;
    its epilogue is :func:`store_output_tile`. One split writes ``dtype``
    directly; more are reduced by ``reduction`` (see ``SPLIT_K_REDUCTIONS``)
    into fp32.
    """
    if splits == 1:
        return kernel_with(jax.ShapeDtypeStruct(shape, dtype))(*inputs)

    def sum_partials(*inputs):
        partials = kernel_with(jax.ShapeDtypeStruct((splits, *shape), jnp.float32))(*inputs)
        return partials.sum(axis=0)

    if reduction == "partials":
        return sum_partials(*inputs)

    @jax.custom_batching.custom_vmap
    def reduce_in_kernel(*inputs):
        return run_with_accumulator(kernel_with(()), inputs, shape)

    @reduce_in_kernel.def_vmap
    def _vmapped(axis_size, in_batched, *inputs):
        # run_state (the accumulator ref) has no batching rule; plgpu.kernel has
        # one (an extra grid axis), so a vmapped call sums partials instead.
        in_axes = jax.tree.map(lambda batched: 0 if batched else None, list(in_batched))
        return jax.vmap(sum_partials, in_axes=in_axes, axis_size=axis_size)(*inputs), True

    return reduce_in_kernel(*inputs)


def fold_vmap_into_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, vmappable by folding the mapped axis into its batch dimension.

    For kernels that reduce into a mutable ref (``pl.run_state``, which has no
    batching rule): every array argument and result of ``fn`` must lead with
    the same batch dimension. A vmapped call runs ``fn`` once on ``[n * B, ...]``
    (unmapped arguments broadcast), so the kernel sees a larger grid.
    """

    @jax.custom_batching.custom_vmap
    def folded(*args):
        return fn(*args)

    @folded.def_vmap
    def _vmapped(axis_size, in_batched, *args):
        def fold(x, batched):
            x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            return x.reshape(axis_size * x.shape[1], *x.shape[2:])

        args = [fold(x, batched) for x, batched in zip(args, in_batched, strict=True)]
        outs = folded(*args)  # itself, so nested vmaps fold again
        outs = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return folded
