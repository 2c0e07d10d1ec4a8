"""Attention of a few new tokens against a KV cache (generation).

``decode_attention`` is the op the models' generation loop calls each step;
see :mod:`pallax.pallas_kernels.decode_attention_mgpu` for the cache layout and
the rolling-buffer convention used by sliding-window layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from pallax._checks import check_bool, check_float, is_concrete
from pallax.pallas_kernels import _tuning
from pallax.pallas_kernels import attention as attention_op
from pallax.pallas_kernels import decode_attention_mgpu as mgpu
from pallax.pallas_kernels._dispatch import choose_implementation
from pallax.pallas_kernels.decode_attention_mgpu import DecodeConfig, DecodeGeometry


def _left_window(local_window_size, cache_len: int) -> int:
    """Validated left window; an int means ``(left, 0)`` since decoding is causal."""
    if local_window_size is None:
        return cache_len + 1  # Unbounded.
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        local_window_size = (int(local_window_size), 0)
    left, right = attention_op.normalize_window(False, local_window_size, cache_len, 1)
    if right != 0:
        raise ValueError(
            f"decode attention is causal: the right window must be 0, got {local_window_size!r}"
        )
    return left


def check_lengths(lengths, *, num_new: int, cache_len: int, rolling: bool, debug_checks: bool):
    """The ``lengths`` contract: each row is either empty (``0``: an unused
    batch slot, whose output is zeros) or holds its new tokens, ``num_new <=
    lengths[b]``, and, unless the cache is a ring, fits it: ``lengths[b] <= cache_len``.

    Concrete lengths are checked here (one host read of ``[batch]`` ints).
    Under jit they are data the caller owns: ``debug_checks=True`` adds
    ``checkify`` checks instead, reported by wrapping the jitted function in
    ``checkify.checkify`` (off by default: not free, and plain jit rejects them).
    """
    upper = None if rolling else cache_len
    bound = f"0 or in [{num_new}, {upper}]" if upper is not None else f"0 or >= {num_new}"
    context = f"(num_new={num_new}, cache_len={cache_len}, rolling={rolling})"
    if is_concrete(lengths):
        host = np.asarray(lengths)
        bad = (host != 0) & ((host < num_new) | (host > upper if upper is not None else False))
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"lengths[{row}]={int(host[row])} must be {bound} {context}")
    elif debug_checks:
        ok = lengths >= num_new
        if upper is not None:
            ok &= lengths <= upper
        checkify.check(
            jnp.all(ok | (lengths == 0)),
            f"decode_attention: lengths must be {bound} {context}; got {{lengths}}",
            lengths=lengths,
        )


def decode_attention_reference(
    query, key_cache, value_cache, lengths, geometry, scale, logits_soft_cap=None
):
    """XLA version of the decode kernel. Shapes as :func:`decode_attention`."""
    num_new, cache_len = query.shape[1], key_cache.shape[1]
    slots = jnp.arange(cache_len, dtype=jnp.int32)
    key_pos = jax.vmap(lambda n: geometry.positions(slots, n))(lengths)  # [B, S]
    query_pos = lengths[:, None] - num_new + jnp.arange(num_new)[None, :]  # [B, T]
    kp, qp = key_pos[:, None, :], query_pos[:, :, None]
    visible = (kp >= 0) & (kp <= qp) & (kp >= qp - geometry.left)  # [B, T, S]
    return attention_op.masked_attention(
        query, key_cache, value_cache, visible, scale=scale, logits_soft_cap=logits_soft_cap
    )


def decode_attention(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    rolling: bool = False,
    logits_soft_cap: float | None = None,
    implementation: attention_op.Implementation = None,
    config: DecodeConfig | None = None,
    debug_checks: bool = False,
) -> jax.Array:
    """Causal attention of ``num_new`` new tokens per sequence against a KV cache.

    Args:
      query: ``[batch, num_new, num_heads, head_dim]``; token ``t`` of sequence
        ``b`` is at position ``lengths[b] - num_new + t``.
      key_cache, value_cache: ``[batch, cache_len, num_kv_heads, head_dim]``,
        already holding the new tokens' keys/values.
      lengths: ``[batch]`` int32, valid positions per sequence (new tokens included),
        ``0`` (an unused row: zeros) or in ``[num_new, cache_len]`` (``>= num_new``
        for a rolling cache). Checked
        when concrete; under jit only with ``debug_checks`` (see :func:`check_lengths`).
      local_window_size: ``left`` or ``(left, 0)``: a token sees positions
        ``[pos - left, pos]``.
      rolling: the cache is a ring buffer (slot = position % cache_len); needs
        ``cache_len >= left + num_new`` so no visible position is overwritten.
      logits_soft_cap: logits become ``cap * tanh(scale * q.k / cap)`` (Gemma 2).
      implementation: ``None`` (Mosaic on Hopper, else XLA), ``"mosaic"``, ``"xla"``.
      debug_checks: under jit, check ``lengths`` with ``checkify`` (wrap the
        caller in ``checkify.checkify`` to get the error).

    Returns:
      ``[batch, num_new, num_heads, head_dim]``.
    """
    attention_op._check_inputs(query, key_cache, value_cache)
    b, num_new, num_heads, head_dim = query.shape
    cache_len, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an integer array of shape ({b},), got {lengths.dtype}{lengths.shape}"
        )
    lengths = lengths.astype(jnp.int32)
    rolling = check_bool("rolling", rolling)
    attention_op.check_config("config", config, DecodeConfig)
    left = _left_window(local_window_size, cache_len)
    if rolling and local_window_size is None:
        raise ValueError("rolling=True needs local_window_size (the ring holds only the window)")
    if rolling and cache_len < left + num_new:
        raise ValueError(
            f"rolling cache of {cache_len} slots cannot hold a window of {left} "
            f"plus {num_new} new tokens"
        )
    check_lengths(
        lengths, num_new=num_new, cache_len=cache_len, rolling=rolling, debug_checks=debug_checks
    )
    geometry = DecodeGeometry(
        left=left,
        num_new=num_new,
        group=num_heads // num_kv_heads,
        cache_len=cache_len,
        rolling=rolling,
    )
    scale = float(1.0 / np.sqrt(head_dim) if scale is None else check_float("scale", scale))
    logits_soft_cap = attention_op.check_soft_cap(logits_soft_cap)
    unsupported = attention_op.mosaic_supports(query, key_cache)
    implementation = choose_implementation(implementation, unsupported)
    if implementation == "xla":
        return decode_attention_reference(
            query, key_cache, value_cache, lengths, geometry, scale, logits_soft_cap
        )

    problem = _tuning.decode_key(head_dim, geometry.group, num_new, cache_len)
    config = _tuning.resolve(config, "decode_attention", DecodeConfig, problem)
    config = config or DecodeConfig.for_head_dim(head_dim)
    group = geometry.group
    rows = num_new * group
    rows_pad = -(-rows // mgpu.ROWS) * mgpu.ROWS
    # [B, T, K, G, D] -> [B, K, T*G, D]: row r = t * group + g.
    q = query.reshape(b, num_new, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q = q.reshape(b, num_kv_heads, rows, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    cache_pad = -(-cache_len // config.block_kv) * config.block_kv
    if cache_pad != cache_len:  # Costs a copy of the cache: size caches in multiples of block_kv.
        pad = ((0, 0), (0, cache_pad - cache_len), (0, 0), (0, 0))
        key_cache, value_cache = jnp.pad(key_cache, pad), jnp.pad(value_cache, pad)
    out, lse = mgpu.decode(
        q,
        key_cache,
        value_cache,
        lengths,
        geometry=geometry,
        scale=scale,
        config=config,
        logits_soft_cap=logits_soft_cap,
    )
    out = mgpu.merge_splits(out, lse)[:, :, :rows]  # [B, K, T*G, D]
    out = out.reshape(b, num_kv_heads, num_new, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(query.shape).astype(query.dtype)
