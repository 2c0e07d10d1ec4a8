"""decode_attention against a per-token numpy reference, ring buffers against flat caches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv

from pallax import testing
from pallax.pallas_kernels import DecodeConfig, decode_attention


def numpy_decode(q, k, v, lengths, left, cap=None, scale=None):
    """Plain loops over (batch, token, head): token t sits at lengths[b] - T + t."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    b, t_new, heads, d = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for t in range(t_new):
            pos = int(lengths[bi]) - t_new + t
            keys = [j for j in range(max(0, pos - left), pos + 1) if j < k.shape[1]]
            if not keys:
                continue
            for h in range(heads):
                logits = k[bi, keys, h // group] @ q[bi, t, h] * (scale or d**-0.5)
                if cap is not None:
                    logits = cap * np.tanh(logits / cap)
                p = np.exp(logits - logits.max())
                out[bi, t, h] = (p / p.sum()) @ v[bi, keys, h // group]
    return out


def to_ring(cache, lengths, ring_len):
    """Ring buffer holding each sequence's latest ``ring_len`` positions at ``pos % ring_len``."""
    cache = np.asarray(cache)
    ring = np.zeros((cache.shape[0], ring_len, *cache.shape[2:]), cache.dtype)
    for b, n in enumerate(np.asarray(lengths)):
        for pos in range(max(0, n - ring_len), n):
            ring[b, pos % ring_len] = cache[b, pos]
    return jnp.asarray(ring)


CASES = [
    # (num_new, cache_len, heads, kv_heads, window, lengths)
    (1, 200, 4, 2, None, [5, 170]),
    (3, 200, 4, 1, 50, [60, 200]),
    (2, 96, 8, 2, 17, [3, 96]),
    (1, 130, 2, 2, None, [0, 130]),  # an empty sequence yields zeros
]


@pytest.mark.parametrize("case", CASES)
def test_xla_decode_matches_numpy(case):
    t, s, h, kh, window, lengths = case
    q, k, v, _ = random_qkv(0, 2, t, s, h, kh, 64, jnp.float32)
    lengths = np.array(lengths, np.int32)
    out = decode_attention(q, k, v, lengths, local_window_size=window, implementation="xla")
    ref = numpy_decode(q, k, v, lengths, window if window is not None else s)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "mosaic"])
def test_rolling_buffer_equals_flat_cache(impl):
    window, num_new, ring_len = 40, 2, 64
    q, k, v, _ = random_qkv(1, 2, num_new, 300, 4, 2, 64, jnp.bfloat16)
    lengths = np.array([300, 23], np.int32)
    ring_k, ring_v = to_ring(k, lengths, ring_len), to_ring(v, lengths, ring_len)
    config = DecodeConfig(block_kv=64, num_splits=1)
    flat = decode_attention(q, k, v, lengths, local_window_size=window, implementation="xla")
    run = functools.partial(
        decode_attention,
        local_window_size=window,
        rolling=True,
        implementation=impl,
        config=config,
    )
    if impl == "mosaic":
        with testing.gpu_interpret():
            out = jax.jit(run)(q, ring_k, ring_v, lengths)
    else:
        out = run(q, ring_k, ring_v, lengths)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(flat, np.float32), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("case", CASES[:3] + [CASES[3]])
def test_mosaic_decode_interpret_matches_numpy(case):
    t, s, h, kh, window, lengths = case
    q, k, v, _ = random_qkv(2, 2, t, s, h, kh, 64, jnp.bfloat16)
    lengths = np.array(lengths, np.int32)
    config = DecodeConfig(block_kv=64, num_splits=2)
    run = functools.partial(
        decode_attention, local_window_size=window, implementation="mosaic", config=config
    )
    with testing.gpu_interpret():
        out = jax.jit(run)(q, k, v, lengths)
    ref = numpy_decode(q, k, v, lengths, window if window is not None else s)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)


def test_bad_decode_inputs():
    q = jnp.zeros((2, 1, 4, 64), jnp.bfloat16)
    cache = jnp.zeros((2, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(2,\)"):
        decode_attention(q, cache, cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="right window must be 0"):
        decode_attention(q, cache, cache, jnp.ones((2,), jnp.int32), local_window_size=(4, 2))
    with pytest.raises(ValueError, match="cannot hold a window of 64"):
        decode_attention(
            q, cache, cache, jnp.ones((2,), jnp.int32), local_window_size=64, rolling=True
        )
    with pytest.raises(ValueError, match="needs local_window_size"):
        decode_attention(q, cache, cache, jnp.ones((2,), jnp.int32), rolling=True)


@pytest.mark.parametrize("impl", ["xla", "mosaic"])
def test_decode_logits_soft_cap_matches_numpy(impl):
    """Gemma 2 soft cap in the decode kernel: logits std ~4 against a cap of 3."""
    num_new, cache_len, window, scale, cap = 2, 128, 50, 0.5, 3.0
    dtype = jnp.bfloat16 if impl == "mosaic" else jnp.float32
    q, k, v, _ = random_qkv(6, 2, num_new, cache_len, 4, 2, 64, dtype)
    lengths = np.array([100, 7], np.int32)
    run = functools.partial(
        decode_attention,
        scale=scale,
        local_window_size=window,
        logits_soft_cap=cap,
        implementation=impl,
        config=DecodeConfig(block_kv=64, num_splits=2),
    )
    if impl == "mosaic":
        with testing.gpu_interpret():
            out = jax.jit(run)(q, k, v, lengths)
    else:
        out = run(q, k, v, lengths)
    ref = numpy_decode(q, k, v, lengths, window, cap=cap, scale=scale)
    tol = 2e-2 if impl == "mosaic" else 2e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
    uncapped = numpy_decode(q, k, v, lengths, window, scale=scale)
    assert np.abs(uncapped - ref).max() > 10 * tol
