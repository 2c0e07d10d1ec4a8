"""Second-order one-shot compression of one linear layer: GPTQ and SparseGPT.

Both minimise the layer's output error ``||X W - X W'||^2`` on calibration
inputs ``X [n, K]`` through the Hessian ``H = 2/n X^T X [K, K]`` (Optimal Brain
Surgeon), one input column at a time: column ``j`` is rounded (GPTQ) or pruned
(SparseGPT) and its error is spread over the columns not yet processed through
row ``j`` of ``U``, the upper Cholesky factor of ``H^-1``. As in the papers
(Frantar et al. 2022, 2023): dead inputs (``H_jj = 0``) are zeroed, ``H`` is
dampened by ``damp * mean(diag H)``, columns run in lazy blocks of
``block_size`` (rank-1 updates inside a block, one matmul to the rest), and
GPTQ finds group scales when it reaches a group (static scales from the
original weights under ``act_order``, so groups stay contiguous in ``K`` and
the result is an ordinary :class:`QuantizedWeight`).

The algorithms work on the transposed weight ``W^T [N, K]`` (rows = outputs,
columns = inputs, as the papers write them), padded to the storage formats'
multiples; padded inputs are dead and padded outputs are zero, so neither
changes the real entries. Each layer is one jit-compiled function
(``lax.fori_loop`` over blocks and over the columns inside a block).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallax.pallas_kernels.quantization import (
    PACK_BLOCK,
    QuantizedWeight,
    _check_bits,
    _group_params,
    _pack,
    _round_up,
)
from pallax.pallas_kernels.sparse import SparseWeight, parse_pattern


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings. ``group_size`` runs along ``in_features`` as in :func:`quantize`;
    ``act_order`` processes inputs by decreasing ``H_jj`` (static group scales)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        _check_bits(self.bits, self.group_size)
        _check_block_and_damp(self.block_size, self.damp)
        if self.group_size < self.block_size and self.block_size % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must divide block_size={self.block_size}"
            )
        if self.group_size > self.block_size and self.group_size % self.block_size:
            raise ValueError(
                f"group_size={self.group_size} must be a multiple of block_size={self.block_size}"
            )


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT settings: ``sparsity`` (unstructured, exact per block of
    ``block_size`` columns) or ``pattern="n:m"`` (keep n of every m inputs)."""

    sparsity: float = 0.5
    pattern: str | None = None
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        _check_block_and_damp(self.block_size, self.damp)
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.pattern is not None:
            _, m = parse_pattern(self.pattern)
            if self.block_size % m:
                raise ValueError(f"pattern {self.pattern!r}: m must divide {self.block_size}")


def _check_block_and_damp(block_size, damp):
    if not isinstance(block_size, int) or block_size <= 0 or PACK_BLOCK % block_size:
        raise ValueError(f"block_size must be a positive divisor of {PACK_BLOCK}, got {block_size}")
    if not 0.0 <= damp < 1.0 or not np.isfinite(damp):
        raise ValueError(f"damp must be in [0, 1), got {damp!r}")


def hessian(x: jax.Array) -> jax.Array:
    """``H = 2/n X^T X`` (fp32 ``[K, K]``) from calibration inputs ``x [..., K]``.

    Under a mesh ``x`` may be sharded over its rows (a data-sharded batch): the
    result is replicated (the row sum becomes an all-reduce).
    """
    x = jnp.asarray(x).astype(jnp.float32)
    count = int(np.prod(x.shape[:-1]))
    mesh = jax.sharding.get_abstract_mesh()
    kwargs = {} if mesh.empty else {"out_sharding": jax.sharding.PartitionSpec()}
    return jnp.einsum("...k,...l->kl", x, x, precision="highest", **kwargs) * (2.0 / count)


def _check_layer(w, h, name):
    if w.ndim != 2:
        raise ValueError(f"{name} expects a 2D [in_features, out_features] weight, got {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name} expects a floating-point weight, got {w.dtype}")
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(
            f"{name}: hessian shape {h.shape} does not match the weight's in_features {k} "
            f"(weight shape {w.shape}; expected ({k}, {k}))"
        )


@contextlib.contextmanager
def _one_device():
    """Under a mesh, runs the enclosed (serial) column loop once, on this
    process's first device, instead of on every device; yields a function that
    moves an array there."""
    if jax.sharding.get_abstract_mesh().empty:
        yield jnp.asarray
        return
    device = jax.local_devices()[0]
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("one",))):
        yield lambda a: jax.device_put(a, jax.sharding.SingleDeviceSharding(device))


def _pad_problem(w, h, kp, np_):
    """Transposed, padded weight ``[Np, Kp]`` and Hessian ``[Kp, Kp]`` (fp32)."""
    k, n = w.shape
    w_t = jnp.pad(w.astype(jnp.float32).T, ((0, np_ - n), (0, kp - k)))
    h = jnp.pad(h.astype(jnp.float32), ((0, kp - k), (0, kp - k)))
    return w_t, h


def _inverse_cholesky(w_t, h, damp, real_k, perm=None):
    """Zeroes dead inputs, permutes, dampens; returns ``(w_t, U)`` with
    ``U^T U = H^-1`` (upper triangular) and whether the factorisation is finite."""
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w_t = jnp.where(dead[None, :], 0.0, w_t)
    if perm is not None:
        w_t, h = w_t[:, perm], h[perm][:, perm]
    real = jnp.arange(h.shape[0]) < real_k
    mean_diag = jnp.sum(jnp.where(real, diag, 0.0)) / real_k
    h = h + damp * mean_diag * jnp.eye(h.shape[0], dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    upper = jnp.linalg.cholesky(h_inv).T
    return w_t, upper, jnp.all(jnp.isfinite(upper))


def _quantize_column(w, scale, zero, bits, symmetric):
    """Stored integer and dequantized value of one column (the format of :func:`quantize`)."""
    if symmetric:
        limit = 2 ** (bits - 1) - 1
        q = jnp.clip(jnp.round(w / scale), -limit, limit)
        return (q + (8 if bits == 4 else 0)).astype(jnp.int32), q * scale
    raw = jnp.clip(jnp.round(w / scale) + zero, 0, 2**bits - 1)
    return raw.astype(jnp.int32), (raw - zero) * scale


@functools.partial(jax.jit, static_argnames=("config", "real_k"))
def _gptq_core(w_t, h, config: GPTQConfig, real_k: int):
    bits, g, block, sym = config.bits, config.group_size, config.block_size, config.symmetric
    np_, kp = w_t.shape
    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if config.act_order else None
    if perm is not None:  # static groups: scales of the original (dead-zeroed) weights
        dead = jnp.diagonal(h) == 0
        static_s, static_z = _group_params(jnp.where(dead[None], 0.0, w_t), bits, g, sym)
        static_z = jnp.zeros_like(static_s) if static_z is None else static_z
    w_t, upper, finite = _inverse_cholesky(w_t, h, config.damp, real_k, perm)

    def column_params(w, i1, carry_s, carry_z):
        """Scale and zero point of each column of the block starting at ``i1``."""
        if perm is not None:
            groups = jax.lax.dynamic_slice(perm, (i1,), (block,)) // g
            return static_s[:, groups], static_z[:, groups], carry_s, carry_z
        if g <= block:
            w1 = jax.lax.dynamic_slice(w, (0, i1), (np_, block))
            s, z = _group_params(w1, bits, g, sym)
            z = jnp.zeros_like(s) if z is None else z
            return jnp.repeat(s, g, axis=1), jnp.repeat(z, g, axis=1), carry_s, carry_z
        # Groups span several blocks: new scales where a group starts.
        s, z = _group_params(jax.lax.dynamic_slice(w, (0, i1), (np_, g)), bits, g, sym)
        z = jnp.zeros_like(s) if z is None else z
        starts = i1 % g == 0
        carry_s, carry_z = jnp.where(starts, s, carry_s), jnp.where(starts, z, carry_z)
        return (
            jnp.broadcast_to(carry_s, (np_, block)),
            jnp.broadcast_to(carry_z, (np_, block)),
            carry_s,
            carry_z,
        )

    def block_step(b, carry):
        w, raw_all, s_all, z_all, carry_s, carry_z = carry
        i1 = b * block
        s1, z1, carry_s, carry_z = column_params(w, i1, carry_s, carry_z)
        u1 = jax.lax.dynamic_slice(upper, (i1, i1), (block, block))

        def column_step(i, inner):
            w1, raw1, err1 = inner
            col = w1[:, i]
            raw, deq = _quantize_column(col, s1[:, i], z1[:, i], bits, sym)
            err = (col - deq) / u1[i, i]
            # U is upper triangular: the update leaves columns < i as they are.
            w1 = w1 - err[:, None] * u1[i][None, :]
            return w1, raw1.at[:, i].set(raw), err1.at[:, i].set(err)

        w1 = jax.lax.dynamic_slice(w, (0, i1), (np_, block))
        init = (w1, jnp.zeros((np_, block), jnp.int32), jnp.zeros((np_, block), jnp.float32))
        _, raw1, err1 = jax.lax.fori_loop(0, block, column_step, init)
        # Lazy batch: the block's error reaches every later column in one matmul
        # (the block's own columns are done and never read again).
        rows = jax.lax.dynamic_slice(upper, (i1, 0), (block, kp))
        w = w - jnp.matmul(err1, rows, precision="highest")
        raw_all = jax.lax.dynamic_update_slice(raw_all, raw1, (0, i1))
        s_all = jax.lax.dynamic_update_slice(s_all, s1, (0, i1))
        z_all = jax.lax.dynamic_update_slice(z_all, z1, (0, i1))
        return w, raw_all, s_all, z_all, carry_s, carry_z

    zeros_f = jnp.zeros((np_, kp), jnp.float32)
    init = (
        w_t,
        jnp.zeros((np_, kp), jnp.int32),
        zeros_f,
        zeros_f,
        jnp.ones((np_, 1), jnp.float32),
        jnp.zeros((np_, 1), jnp.float32),
    )
    _, raw, s_all, z_all, _, _ = jax.lax.fori_loop(0, kp // block, block_step, init)
    if perm is not None:
        inverse = jnp.argsort(perm)
        raw, s_all, z_all = raw[:, inverse], s_all[:, inverse], z_all[:, inverse]
    scales, zeros = s_all[:, ::g], z_all[:, ::g]
    return _pack(raw, bits, sym), scales, None if sym else zeros, finite


def gptq(w: jax.Array, h: jax.Array, config: GPTQConfig = GPTQConfig()) -> QuantizedWeight:
    """GPTQ-quantizes ``w [in_features, out_features]`` given its input Hessian
    ``h [in_features, in_features]`` (see :func:`hessian`).

    Returns the same format as :func:`quantize` (group scales along
    ``in_features``, zero points when asymmetric), so the quantized matmul
    kernels take it unchanged.
    """
    if not isinstance(config, GPTQConfig):
        raise ValueError(f"config must be a GPTQConfig, got {type(config).__name__}")
    _check_layer(w, h, "gptq")
    k, n = w.shape
    kp = _round_up(k, max(config.group_size, PACK_BLOCK))
    np_ = _round_up(n, PACK_BLOCK)
    with _one_device() as put:
        w_t, h = _pad_problem(put(w), put(h), kp, np_)
        values, scales, zeros, finite = _gptq_core(w_t, h, config, k)
    if not bool(finite):
        raise ValueError(
            f"gptq: the dampened Hessian of a [{k}, {n}] layer is not positive definite "
            f"(damp={config.damp}); raise damp or use more calibration tokens"
        )
    return QuantizedWeight(
        values=values,
        scales=scales,
        zeros=zeros,
        in_features=k,
        out_features=n,
        bits=config.bits,
        group_size=config.group_size,
    )


@functools.partial(jax.jit, static_argnames=("config", "real_k", "real_n"))
def _sparsegpt_core(w_t, h, config: SparseGPTConfig, real_k: int, real_n: int):
    block = config.block_size
    np_, kp = w_t.shape
    w_t, upper, finite = _inverse_cholesky(w_t, h, config.damp, real_k)
    real_rows = jnp.arange(np_) < real_n
    nm = parse_pattern(config.pattern) if config.pattern is not None else None

    def block_step(b, carry):
        w, pruned_all = carry
        i1 = b * block
        u1 = jax.lax.dynamic_slice(upper, (i1, i1), (block, block))
        d1 = jnp.diagonal(u1)
        w1 = jax.lax.dynamic_slice(w, (0, i1), (np_, block))
        if nm is None:
            # Adaptive mask: the block's smallest w^2 / [H^-1]_jj^2 (OBS saliency),
            # exactly floor(sparsity * real entries) of them.
            real_cols = jnp.arange(block) + i1 < real_k
            valid = real_rows[:, None] & real_cols[None, :]
            score = jnp.where(valid, (w1 / d1[None, :]) ** 2, jnp.inf)
            count = jnp.floor(
                config.sparsity * real_n * jnp.clip(real_k - i1, 0, block).astype(jnp.float32)
            ).astype(jnp.int32)
            rank = jnp.argsort(jnp.argsort(score.reshape(-1), stable=True), stable=True)
            pruned1 = (rank < count).reshape(np_, block)
        else:
            pruned1 = jnp.zeros((np_, block), bool)

        def column_step(i, inner):
            w1, pruned1, err1 = inner
            if nm is not None:  # choose the pruned m - n of the next m columns from
                keep, m = nm  # the current (already updated) weights
                group = jax.lax.dynamic_slice(w1, (0, i), (np_, m))
                dg = jax.lax.dynamic_slice(d1, (i,), (m,))
                rank = jnp.argsort(jnp.argsort((group / dg) ** 2, axis=1, stable=True), axis=1)
                chosen = jax.lax.dynamic_update_slice(pruned1, rank < m - keep, (0, i))
                pruned1 = jnp.where(i % m == 0, chosen, pruned1)
            col = w1[:, i]
            kept = jnp.where(pruned1[:, i], 0.0, col)
            err = (col - kept) / u1[i, i]
            w1 = w1 - err[:, None] * u1[i][None, :]
            w1 = w1.at[:, i].set(kept)
            return w1, pruned1, err1.at[:, i].set(err)

        init = (w1, pruned1, jnp.zeros((np_, block), jnp.float32))
        w1, pruned1, err1 = jax.lax.fori_loop(0, block, column_step, init)
        rows = jax.lax.dynamic_slice(upper, (i1, 0), (block, kp))
        w = w - jnp.matmul(err1, rows, precision="highest")
        w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
        pruned_all = jax.lax.dynamic_update_slice(pruned_all, pruned1, (0, i1))
        return w, pruned_all

    init = (w_t, jnp.zeros((np_, kp), bool))
    w_t, pruned = jax.lax.fori_loop(0, kp // block, block_step, init)
    return w_t, pruned, finite


def sparsegpt(
    w: jax.Array, h: jax.Array, config: SparseGPTConfig = SparseGPTConfig()
) -> SparseWeight:
    """SparseGPT-prunes ``w [in_features, out_features]`` given its input Hessian
    ``h [in_features, in_features]``; the surviving weights are updated to
    compensate. Returns a :class:`SparseWeight` (values in ``w``'s dtype)."""
    if not isinstance(config, SparseGPTConfig):
        raise ValueError(f"config must be a SparseGPTConfig, got {type(config).__name__}")
    _check_layer(w, h, "sparsegpt")
    k, n = w.shape
    if config.pattern is not None and k % parse_pattern(config.pattern)[1]:
        raise ValueError(f"in_features={k} is not divisible by the {config.pattern} group")
    kp = _round_up(k, config.block_size)
    np_ = _round_up(n, PACK_BLOCK)
    with _one_device() as put:
        w_t, h = _pad_problem(put(w), put(h), kp, np_)
        w_t, pruned, finite = _sparsegpt_core(w_t, h, config, k, n)
        dense = np.asarray(w_t[:n, :k].T).astype(w.dtype)
        keep = ~np.asarray(pruned[:n, :k].T)
    if not bool(finite):
        raise ValueError(
            f"sparsegpt: the dampened Hessian of a [{k}, {n}] layer is not positive definite "
            f"(damp={config.damp}); raise damp or use more calibration tokens"
        )
    return SparseWeight.from_dense(np.where(keep, dense, np.zeros((), dense.dtype)), mask=keep)
