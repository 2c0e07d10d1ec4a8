"""Kernels on local shards: ``shard_map`` wrappers for TP, FSDP and sequence parallelism.

All wrappers take global arrays sharded as described and return global arrays;
gradients flow through the collectives (``all_gather`` <-> ``psum_scatter``,
``ppermute``, ``all_to_all``) by autodiff.

Activations are ``[batch, length, ...]`` with batch over ``(data, fsdp)`` and
length over ``sequence``; attention heads and MLP features over ``tensor``.

Sequence-parallel attention, three ways:

* ``"ulysses"``: all-to-all from sequence-sharded to head-sharded, full
  attention locally (the Pallas kernel on GPU), all-to-all back. Needs heads
  divisible by ``tensor x sequence``; moves q, k, v and o once.
* ``"ring"``: K/V blocks travel around the ring (``ppermute``), merged with an
  online softmax; blocks outside the causal window are skipped by ``lax.cond``.
  Works for any mask; moves ``(sequence - 1)`` K/V shards.
* ``"halo"``: causal sliding windows only: each shard receives just the last
  ``left`` keys/values of the previous shard and runs the windowed kernel
  locally. Moves ``left`` rows of K/V, independent of the sequence length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallax._checks import check_array
from pallax.pallas_kernels import QuantizedWeight, dot_product_attention, linear
from pallax.pallas_kernels.attention import (
    MASK_VALUE,
    check_soft_cap,
    dot_precision,
    normalize_window,
    soft_cap,
)
from pallax.pallas_kernels.attention import _check_inputs as check_inputs
from pallax.pallas_kernels.sparse import SparseShards
from pallax.sharding.comm_quant import FsdpWeight, fsdp_matmul
from pallax.sharding.mesh import BATCH_AXES, FSDP, SEQUENCE, TENSOR
from pallax.sharding.rules import validate_layout

ACTIVATION = P(BATCH_AXES, SEQUENCE, None)
HEADS = P(BATCH_AXES, SEQUENCE, TENSOR, None)  # [batch, length, heads, head_dim]


def _mesh(mesh):
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("no mesh: pass mesh= or call inside jax.set_mesh(mesh)")
    return mesh


def _gather_fsdp(w, axis: int | None, mesh):
    if mesh.shape[FSDP] == 1 or axis is None:
        return w
    return jax.tree.map(lambda leaf: lax.all_gather(leaf, FSDP, axis=axis, tiled=True), w)


def sparse_specs(w: SparseShards, fsdp: int) -> SparseShards:
    """Partition specs of :class:`SparseShards`: every leaf's shard dim over
    ``tensor``; the values (the bulk of the bytes) also over ``fsdp`` (ZeRO-3)
    when their padded length divides, else replicated over it."""
    split_values = fsdp > 1 and w.stacked.values.shape[1] % fsdp == 0
    specs = jax.tree.map(lambda _: P(TENSOR), w)
    values = P(TENSOR, FSDP) if split_values else P(TENSOR)
    return dataclasses.replace(specs, stacked=dataclasses.replace(specs.stacked, values=values))


def _check_sparse_split(w: SparseShards, out_axis: str) -> None:
    expected = "out" if out_axis == TENSOR else "in"
    if w.split != expected:
        raise ValueError(
            f"this linear splits {expected}_features over tensor, but the sparse weight "
            f"was split along {w.split!r}: use split_sparse(w, tensor, {expected!r})"
        )


def _linear_parts(w, out_axis, in_axis, mesh):
    """(weight spec, in-dim axis of the stored layout, local matmul, padded dims) for ``w``.

    All run :func:`pallax.pallas_kernels.linear` locally. Dense weights are
    ``[in, out]``; :class:`QuantizedWeight` stores ``[out, in]`` (padded to 128); its shards
    are re-described by ``as_local`` inside ``shard_map``; :class:`SparseShards`
    hold one independently packed bitmap weight per tensor shard.
    """
    if isinstance(w, SparseShards):
        _check_sparse_split(w, out_axis)
        local = w.stacked
        k_local, n_local = local.in_features, local.out_features
        num = local.values.shape[0]
        padded = (k_local * num, n_local) if w.split == "in" else (k_local, n_local * num)

        specs = sparse_specs(w, mesh.shape[FSDP])
        values_axis = 0 if specs.stacked.values == P(TENSOR, FSDP) else None

        def sparse_local(x, shard, **kwargs):
            local = shard.local()  # ZeRO-3: its values come back whole for the product
            values = _gather_fsdp(local.values, values_axis, mesh)
            return linear(x, dataclasses.replace(local, values=values), **kwargs)

        return specs, None, sparse_local, padded
    if isinstance(w, FsdpWeight):  # dense, with the fsdp collectives of comm_quant
        replicated = lambda axis: None if axis == FSDP else axis  # noqa: E731
        specs = FsdpWeight(
            P(in_axis, out_axis),
            None if w.reference is None else P(replicated(in_axis), replicated(out_axis)),
            w.comm,
        )
        gather_axis = 0 if in_axis == FSDP else 1

        def fsdp_local(x, w, **kwargs):
            if kwargs.get("act_bits") is not None:
                raise ValueError("act_bits needs a QuantizedWeight, got a dense FsdpWeight")
            return fsdp_matmul(w.comm, gather_axis, linear, x, w.value, w.reference)

        return specs, None, fsdp_local, w.shape
    if isinstance(w, QuantizedWeight):

        def matmul(x, w_local, **kwargs):
            return linear(x, w_local.as_local(), **kwargs)

        padded = (w.padded_in_features, w.values.shape[0])
        return w.partition_specs(out_axis, in_axis), 1, matmul, padded
    return P(in_axis, out_axis), 0, linear, w.shape


def _check_linear(x, w, mesh, out_axis: str, in_axis: str, what: str):
    """Shapes against the mesh before shard_map (whose errors name no argument)."""
    check_array("x", x)
    if x.ndim != 3:
        raise ValueError(f"{what}: x must be [batch, length, in], got shape {x.shape}")
    if isinstance(w, SparseShards):
        _check_sparse_split(w, out_axis)  # the likelier mistake than a shape mismatch
    if isinstance(w, SparseShards | QuantizedWeight):
        k, n = w.shape
    else:
        check_array("w", w, ndim=2)
        k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x {x.shape} does not match weight {tuple(w.shape)} ([in, out])")
    batch_devices = mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]
    if x.shape[0] % batch_devices or x.shape[1] % mesh.shape[SEQUENCE]:
        raise ValueError(
            f"{what}: x {x.shape} must have batch divisible by data x fsdp ({batch_devices}) "
            f"and length by sequence ({mesh.shape[SEQUENCE]})"
        )
    if isinstance(w, QuantizedWeight):
        dims = {out_axis: w.values.shape[0], in_axis: w.scales.shape[1]}
        names = {out_axis: "padded out_features", in_axis: "groups"}
    elif isinstance(w, SparseShards):
        return
    else:
        dims = {in_axis: k, out_axis: n}
        names = {in_axis: "in_features", out_axis: "out_features"}
    for axis, size in dims.items():
        if size % mesh.shape[axis]:
            raise ValueError(
                f"{what}: weight {names[axis]}={size} is not divisible by the {axis} axis "
                f"({mesh.shape[axis]})"
            )


def _pad_last(x, size):
    return (
        x
        if x.shape[-1] == size
        else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
    )


def column_parallel(x, w, *, mesh=None, **matmul_kwargs):
    """``x @ w`` with ``w [in, out]`` split by columns over ``tensor``.

    x: ``[batch, length, in]`` replicated over ``tensor``; w: a dense array
    sharded ``P(fsdp, tensor)``, a :class:`QuantizedWeight` sharded by
    ``w.partition_specs(tensor, fsdp)``, or ``split_sparse(w, tensor, "out")``
    with its leading dim over ``tensor``. Returns ``[batch, length, out]``
    sharded over ``tensor`` on the last dim; the only communication is the
    ZeRO-3 weight gather over ``fsdp``. ``matmul_kwargs`` go to the local
    matmul (e.g. ``act_bits=8``).
    """
    mesh = _mesh(mesh)
    _check_linear(x, w, mesh, TENSOR, FSDP, "column_parallel")
    w_spec, in_dim, matmul, (k_padded, n_padded) = _linear_parts(w, TENSOR, FSDP, mesh)
    out_features = w.shape[1]

    def local(x, w):
        return matmul(x, _gather_fsdp(w, in_dim, mesh), **matmul_kwargs)

    y = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(ACTIVATION, w_spec),
        out_specs=P(BATCH_AXES, SEQUENCE, TENSOR),
    )(_pad_last(x, k_padded), w)
    return y if n_padded == out_features else y[..., :out_features]


def row_parallel(x, w, *, mesh=None, **matmul_kwargs):
    """``x @ w`` with ``w [in, out]`` split by rows over ``tensor``; psum over ``tensor``.

    x: ``[batch, length, in]`` sharded over ``tensor`` on the last dim (the
    output of :func:`column_parallel`); w: dense ``P(tensor, fsdp)``, a
    :class:`QuantizedWeight` sharded by ``w.partition_specs(fsdp, tensor)``, or
    ``split_sparse(w, tensor, "in")`` with its leading dim over ``tensor``.
    """
    mesh = _mesh(mesh)
    _check_linear(x, w, mesh, FSDP, TENSOR, "row_parallel")
    w_spec, in_dim, matmul, (k_padded, n_padded) = _linear_parts(w, FSDP, TENSOR, mesh)
    out_features = w.shape[1]

    def local(x, w):
        out_dim = None if in_dim is None else 1 - in_dim
        return lax.psum(matmul(x, _gather_fsdp(w, out_dim, mesh), **matmul_kwargs), TENSOR)

    y = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(BATCH_AXES, SEQUENCE, TENSOR), w_spec),
        out_specs=ACTIVATION,
    )(_pad_last(x, k_padded), w)
    return y if n_padded == out_features else y[..., :out_features]


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------


def _block_attention(q, k, v, q_start, k_start, scale, left, right, logits_soft_cap=None):
    """Attention of a query block to a key block at global offsets -> (out f32, lse).

    Rows that see no key get ``out = 0`` and ``lse = MASK_VALUE`` so that the
    merge gives them no weight (and no NaN in gradients).
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    precision = dot_precision(q.dtype)
    logits = (
        jnp.einsum(
            "btkgd,bskd->bkgts", qg, k, precision=precision, preferred_element_type=jnp.float32
        )
        * scale
    )
    logits = soft_cap(logits, logits_soft_cap)
    offsets = (k_start + jnp.arange(s))[None, :] - (q_start + jnp.arange(t))[:, None]
    mask = (offsets >= -left) & (offsets <= right)
    logits = jnp.where(mask, logits, MASK_VALUE)
    row_max = logits.max(axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - row_max)
    denom = unnormalized.sum(axis=-1, keepdims=True)
    out = jnp.einsum(
        "bkgts,bskd->btkgd",
        (unnormalized / denom).astype(v.dtype),
        v,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    visible = mask.any(axis=1)  # [t]
    lse = (row_max + jnp.log(denom))[..., 0]  # [b, k, g, t]
    lse = jnp.where(visible, lse, MASK_VALUE).transpose(0, 3, 1, 2).reshape(b, t, h)
    out = jnp.where(visible[None, :, None, None, None], out, 0.0)
    return out.reshape(b, t, h, d), lse


def _merge(out_a, lse_a, out_b, lse_b):
    lse = jnp.maximum(lse_a, lse_b)
    w_a, w_b = jnp.exp(lse_a - lse), jnp.exp(lse_b - lse)
    total = w_a + w_b
    out = (out_a * w_a[..., None] + out_b * w_b[..., None]) / total[..., None]
    return out, lse + jnp.log(total)


def _ring_local(q, k, v, *, num_shards, scale, left, right, logits_soft_cap=None):
    shard = lax.axis_index(SEQUENCE)
    length = q.shape[1]
    q_start = shard * length
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:-1], MASK_VALUE, jnp.float32)
    shift = [(i, (i + 1) % num_shards) for i in range(num_shards)]
    for step in range(num_shards):
        k_start = ((shard - step) % num_shards) * length
        # Skip blocks that lie entirely outside every query's window.
        visible = (k_start <= q_start + length - 1 + right) & (
            k_start + length - 1 >= q_start - left
        )

        def attend(k, v, k_start=k_start):
            return _block_attention(q, k, v, q_start, k_start, scale, left, right, logits_soft_cap)

        def skip(k, v):
            # *_like keeps q's per-device variance, as shard_map's typing requires.
            return (
                jnp.zeros_like(q, jnp.float32),
                jnp.full_like(q[..., 0], MASK_VALUE, jnp.float32),
            )

        block_out, block_lse = lax.cond(visible, attend, skip, k, v)
        out, lse = _merge(out, lse, block_out, block_lse)
        if step < num_shards - 1:
            k, v = lax.ppermute((k, v), SEQUENCE, shift)
    return out.astype(q.dtype)


def _halo_local(q, k, v, *, num_shards, left, attend):
    length = q.shape[1]
    # Shard i sends its last `left` rows to shard i + 1; shard 0 receives zeros.
    send = [(i, i + 1) for i in range(num_shards - 1)]
    halo_k, halo_v = lax.ppermute((k[:, length - left :], v[:, length - left :]), SEQUENCE, send)
    k_ext = jnp.concatenate([halo_k, k], axis=1)
    v_ext = jnp.concatenate([halo_v, v], axis=1)

    def first_shard():
        return attend(q, k, v, is_causal=True, local_window_size=(left, 0))

    def other_shards():
        # Local query i and extended key j (global j - left) are visible iff
        # i <= j <= i + left: a (0, left) window without the causal flag.
        return attend(q, k_ext, v_ext, is_causal=False, local_window_size=(0, left))

    return lax.cond(lax.axis_index(SEQUENCE) == 0, first_shard, other_shards)


def _ulysses_local(q, k, v, *, attend, is_causal, local_window_size):
    def to_heads(x):  # [b, L/sp, h, d] -> [b, L, h/sp, d]
        return lax.all_to_all(x, SEQUENCE, split_axis=2, concat_axis=1, tiled=True)

    out = attend(
        to_heads(q),
        to_heads(k),
        to_heads(v),
        is_causal=is_causal,
        local_window_size=local_window_size,
    )
    return lax.all_to_all(out, SEQUENCE, split_axis=1, concat_axis=2, tiled=True)


def attention(
    query,
    key,
    value,
    *,
    mesh=None,
    is_causal: bool = False,
    local_window_size=None,
    sequence_method: str = "ulysses",
    scale: float | None = None,
    implementation=None,
    logits_soft_cap: float | None = None,
):
    """Sharded ``dot_product_attention``: heads over ``tensor``, length over ``sequence``.

    q/k/v: ``[batch, length, heads, head_dim]`` sharded ``P((data, fsdp),
    sequence, tensor, None)``. ``sequence_method`` picks how the ``sequence``
    axis is handled when it is larger than 1 (see module docstring).
    """
    mesh = _mesh(mesh)
    check_inputs(query, key, value)
    batch, length, num_heads, head_dim = query.shape
    if key.shape[1] != length:
        raise ValueError(
            f"sharded attention needs equal q/k lengths, got {query.shape} vs {key.shape}"
        )
    batch_devices = mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]
    if batch % batch_devices:
        raise ValueError(f"batch={batch} is not divisible by data x fsdp ({batch_devices})")
    validate_layout(
        mesh,
        num_heads=num_heads,
        num_kv_heads=key.shape[2],
        seq_len=length,
        sequence_method=sequence_method,
    )
    num_shards = mesh.shape[SEQUENCE]
    scale = float(head_dim**-0.5 if scale is None else scale)
    logits_soft_cap = check_soft_cap(logits_soft_cap)
    attend = functools.partial(
        dot_product_attention,
        scale=scale,
        implementation=implementation,
        logits_soft_cap=logits_soft_cap,
    )
    left, right = normalize_window(is_causal, local_window_size, length, key.shape[1])
    if num_shards == 1:
        local = functools.partial(attend, is_causal=is_causal, local_window_size=local_window_size)
    elif sequence_method == "ulysses":
        local = functools.partial(
            _ulysses_local,
            attend=attend,
            is_causal=is_causal,
            local_window_size=local_window_size,
        )
    elif sequence_method == "ring":
        local = functools.partial(
            _ring_local,
            num_shards=num_shards,
            scale=scale,
            left=left,
            right=right,
            logits_soft_cap=logits_soft_cap,
        )
    else:  # halo
        local_length = length // num_shards
        if right != 0 or left >= length:
            raise ValueError(
                "halo exchange needs a causal sliding window (is_causal=True or right=0 and "
                f"left < seq_len); got is_causal={is_causal}, "
                f"local_window_size={local_window_size!r}: use 'ring' or 'ulysses'"
            )
        if left > local_length:
            raise ValueError(
                f"halo exchange needs the window (left={left}) to fit in one shard "
                f"(length {length} / sequence {num_shards} = {local_length}); use 'ring'"
            )
        if left == 0:
            local = functools.partial(attend, is_causal=True, local_window_size=(0, 0))
        else:
            local = functools.partial(_halo_local, num_shards=num_shards, left=left, attend=attend)
    return jax.shard_map(local, mesh=mesh, in_specs=(HEADS,) * 3, out_specs=HEADS)(
        query, key, value
    )


def halo_bytes(batch, seq, kv_heads, head_dim, itemsize, left, sequence) -> int:
    """K+V bytes one device receives per attention call with halo exchange."""
    del seq, sequence
    return 2 * batch * left * kv_heads * head_dim * itemsize


def ring_bytes(batch, seq, kv_heads, head_dim, itemsize, left, sequence) -> int:
    del left
    return 2 * (sequence - 1) * batch * (seq // sequence) * kv_heads * head_dim * itemsize


def ulysses_bytes(batch, seq, heads, kv_heads, head_dim, itemsize, sequence) -> int:
    """q, k, v in and o out through all-to-all: each keeps 1/sequence locally."""
    local = batch * (seq // sequence) * head_dim * itemsize
    return int(local * (2 * heads + 2 * kv_heads) * (sequence - 1) / sequence)
