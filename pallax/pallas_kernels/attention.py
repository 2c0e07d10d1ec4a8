"""Windowed dot-product attention: one public op, Mosaic GPU kernel or XLA.

``dot_product_attention`` mirrors ``jax.nn.dot_product_attention`` (layout
``[batch, seq, heads, head_dim]``, ``is_causal``, ``local_window_size``, GQA)
and adds ``implementation="mosaic"``: the Pallas Hopper kernels of
:mod:`pallax.pallas_kernels.attention_mgpu`, whose cost grows with
``seq x window`` rather than ``seq^2``.

``logits_soft_cap`` (the name Tokamax-style APIs use; ``jax.nn`` has none)
squashes the scaled logits to ``cap * tanh(logits / cap)`` before masking, as
Gemma 2 does; the Mosaic kernels apply it inside the online softmax and their
backward multiplies dS by ``1 - tanh^2``.

One deliberate difference from ``jax.nn``: a query row that can see no key at
all (possible with windows and unequal lengths) yields zeros, not the mean of
``value``; both implementations here agree on that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallax._checks import check_array, check_bool, check_float, is_int
from pallax.pallas_kernels import _tuning, attention_backward_wide_mgpu, attention_mgpu
from pallax.pallas_kernels._dispatch import Implementation, choose_implementation, cotangent_like
from pallax.pallas_kernels.attention_mgpu import AttentionConfig, Window

MASK_VALUE = -1e30  # Finite: far below any real logit, yet exp(MASK - max) is 0, not NaN.


def normalize_window(
    is_causal: bool, local_window_size: int | tuple[int, int] | None, q_len: int, kv_len: int
) -> tuple[int, int]:
    """Returns static ``(left, right)``; "unbounded" is clamped to ``q_len + kv_len``."""
    unbounded = q_len + kv_len
    left = right = unbounded
    if local_window_size is not None:
        if is_int(local_window_size):
            window = (int(local_window_size), int(local_window_size))
        elif isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2:
            window = tuple(local_window_size)
        else:
            window = None
        if window is None or not all(is_int(w) for w in window):
            raise ValueError(
                f"local_window_size must be an int or a (left, right) pair of ints, "
                f"got {local_window_size!r}"
            )
        if min(window) < 0:
            raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
        left, right = min(int(window[0]), unbounded), min(int(window[1]), unbounded)
    if is_causal:
        right = min(right, 0)
    return left, right


def check_soft_cap(logits_soft_cap) -> float | None:
    """Validated ``logits_soft_cap``: ``None`` or a finite float > 0."""
    if logits_soft_cap is None:
        return None
    if isinstance(logits_soft_cap, bool) or not isinstance(
        logits_soft_cap, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}"
        )
    if not (np.isfinite(logits_soft_cap) and logits_soft_cap > 0):
        raise ValueError(f"logits_soft_cap must be finite and > 0, got {logits_soft_cap!r}")
    return float(logits_soft_cap)


def soft_cap(logits, logits_soft_cap: float | None):
    """``cap * tanh(logits / cap)`` (identity for ``None``)."""
    if logits_soft_cap is None:
        return logits
    return logits_soft_cap * jnp.tanh(logits / logits_soft_cap)


def _check_inputs(query, key, value, names=("query", "key", "value")):
    for name, x in zip(names, (query, key, value), strict=True):
        check_array(name, x)
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {x.shape}"
            )
    b, _, num_heads, head_dim = query.shape
    kb, kv_len, num_kv_heads, k_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value shape {value.shape} must equal key shape {key.shape}")
    if kb != b:
        raise ValueError(f"batch mismatch: query {query.shape} vs key {key.shape}")
    if head_dim == 0:
        raise ValueError(f"head_dim must be >= 1, got query shape {query.shape}")
    if k_dim != head_dim:
        raise ValueError(f"head_dim mismatch: query {query.shape} vs key {key.shape}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"kv heads ({num_kv_heads}, key {key.shape}) must divide query heads "
            f"({num_heads}, query {query.shape})"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query/key/value dtypes must match, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise ValueError(f"attention needs floating-point inputs, got {query.dtype}")


def check_config(name: str, config, cls) -> None:
    if config is not None and not isinstance(config, cls):
        raise ValueError(f"{name} must be a {cls.__name__} or None, got {type(config).__name__}")


def mosaic_supports(query, key) -> str | None:
    """``None`` if the Mosaic kernel handles these inputs, else the reason it does not."""
    if jnp.dtype(query.dtype) not in attention_mgpu.SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (Mosaic kernel supports bfloat16/float16)"
    if query.shape[-1] not in attention_mgpu.SUPPORTED_HEAD_DIMS:
        return f"head_dim {query.shape[-1]} (Mosaic kernel supports 64/128/256)"
    return None


def dot_precision(dtype):
    """bf16 inputs with fp32 accumulation (as jax.nn does); faster on CPU too.

    fp16 requests no algorithm: the CPU's dot_general rejects F16_F16_F32, and
    ``preferred_element_type=float32`` already accumulates in fp32 on every backend.
    """
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    return None


def masked_attention(query, key, value, mask, *, scale: float, logits_soft_cap=None):
    """GQA attention under a boolean ``mask [B or 1, T, S]``, fp32 softmax, XLA.

    Logits are ``scale * q.k``, soft-capped when ``logits_soft_cap`` is set.

    Rows without any visible key give zeros. Shapes: query ``[B, T, H, D]``,
    key/value ``[B, S, K, D]`` -> ``[B, T, H, D]``.
    """
    b, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    q = query.reshape(b, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    precision = dot_precision(query.dtype)
    logits = jnp.einsum(
        "btkgd,bskd->bkgts", q, key, precision=precision, preferred_element_type=jnp.float32
    )
    # A finite fill keeps exp() fast on CPU; rows without any visible key are
    # zeroed explicitly below instead of averaging over masked keys.
    logits = soft_cap(logits * scale, logits_soft_cap)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskd->btkgd",
        probs.astype(value.dtype),
        value,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    out = out * mask.any(axis=-1)[:, :, None, None, None]
    return out.reshape(query.shape).astype(query.dtype)


def attention_reference(
    query, key, value, *, scale: float, left: int, right: int, logits_soft_cap=None
):
    """XLA attention with the window mask; differentiable by autodiff."""
    offsets = jnp.arange(key.shape[1])[None, :] - jnp.arange(query.shape[1])[:, None]
    mask = (offsets >= -left) & (offsets <= right)  # [T, S]
    return masked_attention(
        query, key, value, mask[None], scale=scale, logits_soft_cap=logits_soft_cap
    )


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_seq(x, length: int):
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _mosaic_attention(
    query, key, value, scale, window: Window, config: AttentionConfig, logits_soft_cap
):
    return _mosaic_forward(query, key, value, scale, window, config, logits_soft_cap)[0]


def _mosaic_forward(query, key, value, scale, window, config, logits_soft_cap):
    q_pad = _round_up(window.q_len, config.q_multiple)
    kv_pad = _round_up(window.kv_len, config.kv_multiple)
    q, k, v = _pad_seq(query, q_pad), _pad_seq(key, kv_pad), _pad_seq(value, kv_pad)
    out, lse = attention_mgpu.forward(
        q, k, v, window=window, scale=scale, config=config, logits_soft_cap=logits_soft_cap
    )
    return out[:, : window.q_len], (q, k, v, out, lse)


def _mosaic_attention_bwd(scale, window, config, logits_soft_cap, residuals, d_out):
    q, k, v, out, lse = residuals
    do = _pad_seq(d_out.astype(q.dtype), q.shape[1])
    # head_dim 256: both warpgroups share one tile and split the head dimension.
    wide = q.shape[-1] == attention_backward_wide_mgpu.HEAD_DIM
    backward = attention_backward_wide_mgpu.backward if wide else attention_mgpu.backward
    dq, dk, dv = backward(
        q,
        k,
        v,
        out,
        lse,
        do,
        window=window,
        scale=scale,
        config=config,
        logits_soft_cap=logits_soft_cap,
    )
    grads = dq[:, : window.q_len], dk[:, : window.kv_len], dv[:, : window.kv_len]
    return tuple(cotangent_like(g, x) for g, x in zip(grads, (q, k, v), strict=True))


_mosaic_attention.defvjp(_mosaic_forward, _mosaic_attention_bwd)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    implementation: Implementation = None,
    config: AttentionConfig | None = None,
) -> jax.Array:
    """Scaled dot-product attention with causal / sliding-window masks and GQA.

    Args:
      query: ``[batch, q_len, num_heads, head_dim]``.
      key, value: ``[batch, kv_len, num_kv_heads, head_dim]``, ``num_kv_heads``
        dividing ``num_heads``.
      scale: logit scale, default ``1/sqrt(head_dim)``.
      is_causal: query ``i`` sees keys ``j <= i`` (positions counted from 0 in
        both sequences, as in ``jax.nn.dot_product_attention``).
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys
        ``[i - left, i + right]``; combined with ``is_causal`` by intersection.
      logits_soft_cap: if set, logits become ``cap * tanh(scale * q.k / cap)``
        before masking and softmax (Gemma 2's attention soft-capping).
      implementation: ``None`` (Mosaic kernel on Hopper for bf16/fp16, XLA
        otherwise), ``"mosaic"`` or ``"xla"``.
      config: tile sizes for the Mosaic kernel, default from head_dim, and
        ``p_operand`` (register A operands on the GPU, SMEM staging in GPU
        interpret mode; see :class:`AttentionConfig`). ``dq_mode`` picks the
        backward's dQ: ``"fused"`` into the dK/dV kernel with fp32 atomic adds
        (the default where it fits; not bitwise reproducible run to run) or
        ``"separate"`` (a second, deterministic kernel).

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``query.dtype``.
    """
    _check_inputs(query, key, value)
    q_len, kv_len, head_dim = query.shape[1], key.shape[1], query.shape[-1]
    is_causal = check_bool("is_causal", is_causal)
    left, right = normalize_window(is_causal, local_window_size, q_len, kv_len)
    scale = float(1.0 / np.sqrt(head_dim) if scale is None else check_float("scale", scale))
    check_config("config", config, AttentionConfig)
    logits_soft_cap = check_soft_cap(logits_soft_cap)
    implementation = choose_implementation(implementation, mosaic_supports(query, key))
    if implementation == "xla":
        return attention_reference(
            query,
            key,
            value,
            scale=scale,
            left=left,
            right=right,
            logits_soft_cap=logits_soft_cap,
        )
    problem = _tuning.attention_key(head_dim, q_len, kv_len, left, right)
    config = _tuning.resolve(config, "attention", AttentionConfig, problem)
    config = config or AttentionConfig.for_head_dim(head_dim)
    window = Window(left=left, right=right, q_len=q_len, kv_len=kv_len)
    return _mosaic_attention(query, key, value, scale, window, config, logits_soft_cap)
