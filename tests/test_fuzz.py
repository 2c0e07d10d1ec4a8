"""Property-based fuzzing of the kernels against independent references.

XLA paths (the CPU default) against ``jax.nn.dot_product_attention``, numpy
loops and ``scipy.sparse``: random shapes, windows ``(left, right)`` from 0 to
past the sequence, GQA ratios, odd lengths, sparsities up to 99.9%, group sizes,
bits and dtypes. A smaller budget runs the Mosaic kernels in GPU interpret mode.
Budgets come from the hypothesis profile (tests/conftest.py): ``ci`` by default,
``--hypothesis-profile=long`` for long runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from pallax import testing
from pallax.pallas_kernels import (
    decode_attention,
    dot_product_attention,
    quantize,
    quantized_matmul,
    sparse_matmul,
    sparsify,
)
from pallax.pallas_kernels.attention import normalize_window

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}
# Interpret mode simulates every thread: a tenth of the XLA budget, at least 2.
MOSAIC_EXAMPLES = max(2, settings.default.max_examples // 10)


def normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def windows(max_size: int = 40):
    """None, an int, or a (left, right) pair; 0 and sizes past the sequence included."""
    size = st.integers(0, max_size)
    return st.one_of(st.none(), size, st.tuples(size, size))


@st.composite
def attention_problems(draw, head_dims=(8, 16, 32), dtypes=DTYPES, max_len=24):
    kv_heads = draw(st.integers(1, 3))
    return dict(
        batch=draw(st.integers(1, 2)),
        q_len=draw(st.integers(1, max_len)),
        kv_len=draw(st.integers(1, max_len)),
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from(head_dims)),
        is_causal=draw(st.booleans()),
        window=draw(windows()),
        dtype=draw(dtypes),
        seed=draw(st.integers(0, 2**16)),
    )


def make_qkv(p):
    q = normal(p["seed"], (p["batch"], p["q_len"], p["heads"], p["head_dim"]), p["dtype"])
    shape = (p["batch"], p["kv_len"], p["kv_heads"], p["head_dim"])
    return q, normal(p["seed"] + 1, shape, p["dtype"]), normal(p["seed"] + 2, shape, p["dtype"])


def check_attention_against_jax_nn(p, out):
    q, k, v = make_qkv(p)
    left, right = normalize_window(p["is_causal"], p["window"], p["q_len"], p["kv_len"])
    i, j = np.arange(p["q_len"])[:, None], np.arange(p["kv_len"])[None, :]
    rows = ((j >= i - left) & (j <= i + right)).any(axis=1)
    as32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = jax.nn.dot_product_attention(
        as32(q), as32(k), as32(v), is_causal=p["is_causal"], local_window_size=p["window"]
    )
    got = np.asarray(out, np.float32)
    assert out.dtype == p["dtype"] and out.shape == q.shape
    tol = TOLERANCE[p["dtype"]]
    np.testing.assert_allclose(got[:, rows], np.asarray(want)[:, rows], atol=2 * tol, rtol=tol)
    assert np.all(got[:, ~rows] == 0), "a query that sees no key must give zeros"


@given(attention_problems())
def test_attention_xla_matches_jax_nn(p):
    q, k, v = make_qkv(p)
    out = dot_product_attention(
        q, k, v, is_causal=p["is_causal"], local_window_size=p["window"], implementation="xla"
    )
    check_attention_against_jax_nn(p, out)


@settings(max_examples=MOSAIC_EXAMPLES)
@given(attention_problems(head_dims=(64,), dtypes=st.sampled_from([jnp.bfloat16]), max_len=80))
def test_attention_mosaic_interpret_matches_jax_nn(p):
    q, k, v = make_qkv(p)

    def run(q, k, v):
        return dot_product_attention(
            q,
            k,
            v,
            is_causal=p["is_causal"],
            local_window_size=p["window"],
            implementation="mosaic",
        )

    with testing.gpu_interpret():
        out = jax.jit(run)(q, k, v)
    check_attention_against_jax_nn(p, out)


def decode_reference(q, k, v, lengths, left, rolling):
    """Per-token numpy loop (float64) over the positions each new token may see."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, num_new, heads, d = q.shape
    cache_len, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for t in range(num_new):
            pos = int(lengths[bi]) - num_new + t
            seen = [s for s in range(max(0, pos - left), pos + 1)]
            slots = [s % cache_len if rolling else s for s in seen]
            for h in range(heads):
                kh = h // (heads // kv_heads)
                logits = k[bi, slots, kh] @ q[bi, t, h] / np.sqrt(d)
                weights = np.exp(logits - logits.max())
                out[bi, t, h] = weights @ v[bi, slots, kh] / weights.sum()
    return out


@st.composite
def decode_problems(draw):
    kv_heads = draw(st.integers(1, 2))
    num_new = draw(st.integers(1, 3))
    rolling = draw(st.booleans())
    if rolling:
        left = draw(st.integers(0, 12))
        cache_len = draw(st.integers(left + num_new, left + num_new + 4))
        max_length = 3 * cache_len
    else:
        left = draw(st.one_of(st.none(), st.integers(0, 20)))
        cache_len = draw(st.integers(num_new, 20))
        max_length = cache_len
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(num_new, max_length), min_size=batch, max_size=batch))
    return dict(
        batch=batch,
        num_new=num_new,
        heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        cache_len=cache_len,
        left=left,
        rolling=rolling,
        lengths=lengths,
        dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )


@given(decode_problems())
def test_decode_attention_xla_matches_numpy(p):
    q = normal(p["seed"], (p["batch"], p["num_new"], p["heads"], p["head_dim"]), p["dtype"])
    shape = (p["batch"], p["cache_len"], p["kv_heads"], p["head_dim"])
    k, v = normal(p["seed"] + 1, shape, p["dtype"]), normal(p["seed"] + 2, shape, p["dtype"])
    lengths = jnp.asarray(p["lengths"], jnp.int32)
    out = decode_attention(
        q, k, v, lengths, local_window_size=p["left"], rolling=p["rolling"], implementation="xla"
    )
    left = p["cache_len"] + 1 if p["left"] is None else p["left"]
    want = decode_reference(q, k, v, p["lengths"], left, p["rolling"])
    tol = TOLERANCE[p["dtype"]]
    assert out.dtype == p["dtype"]
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2 * tol, rtol=tol)


@st.composite
def quant_problems(draw):
    bits = draw(st.sampled_from([4, 8]))
    return dict(
        k=draw(st.integers(1, 300)),
        n=draw(st.integers(1, 140)),
        bits=bits,
        group_size=draw(st.sampled_from([16, 32, 64, 128, 256])),
        symmetric=draw(st.booleans()),
        dtype=draw(DTYPES),
        scale=draw(st.sampled_from([1e-3, 1.0, 30.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def numpy_group_scales(w, bits, group_size, symmetric):
    """Independent scales: per output column, per group of group_size inputs (zero padded)."""
    k, n = w.shape
    padded_k = -(-k // max(group_size, 128)) * max(group_size, 128)
    padded = np.zeros((padded_k, n))
    padded[:k] = w
    groups = padded.reshape(padded_k // group_size, group_size, n)
    if symmetric:
        scales = np.abs(groups).max(axis=1) / (2 ** (bits - 1) - 1)
    else:
        lo, hi = np.minimum(groups.min(axis=1), 0), np.maximum(groups.max(axis=1), 0)
        scales = (hi - lo) / (2**bits - 1)
    return np.maximum(scales, np.finfo(np.float32).tiny)  # [groups, n]


@given(quant_problems())
def test_quantize_error_and_matmul_match_numpy(p):
    w = normal(p["seed"], (p["k"], p["n"])) * p["scale"]
    qw = quantize(w.astype(p["dtype"]), p["bits"], p["group_size"], p["symmetric"])
    w64 = np.asarray(w.astype(p["dtype"]), np.float64)
    group_scales = numpy_group_scales(w64, p["bits"], p["group_size"], p["symmetric"])
    stored = np.asarray(qw.scales, np.float64)[: p["n"], : group_scales.shape[0]].T
    np.testing.assert_allclose(stored, group_scales, rtol=1e-5)
    scales = np.repeat(group_scales, p["group_size"], axis=0)[: p["k"]]
    error = np.abs(np.asarray(qw.dequantize(), np.float64) - w64)
    # Round to nearest: within half a step (plus float32 rounding of w / s).
    assert np.all(error <= 0.5 * scales * (1 + 1e-4) + 1e-6 * np.abs(w64)), error.max()
    x = normal(p["seed"] + 1, (3, p["k"]), p["dtype"])
    got = quantized_matmul(x, qw, implementation="xla")
    want = np.asarray(x, np.float64) @ np.asarray(qw.dequantize(), np.float64)
    tol = TOLERANCE[p["dtype"]] * (1 + np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=4 * tol, rtol=0)


@settings(max_examples=MOSAIC_EXAMPLES)
@given(
    m=st.integers(1, 20),
    k=st.integers(1, 300),
    n=st.integers(1, 200),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantized_matmul_mosaic_interpret_matches_numpy(m, k, n, bits, symmetric, seed):
    qw = quantize(normal(seed, (k, n)), bits, 128, symmetric)
    x = normal(seed + 1, (m, k), jnp.bfloat16)
    with testing.gpu_interpret():
        got = jax.jit(lambda a: quantized_matmul(a, qw, implementation="mosaic"))(x)
    want = np.asarray(x, np.float64) @ np.asarray(qw.dequantize(), np.float64)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, atol=3e-2 * (1 + np.abs(want).max()), rtol=0
    )


@st.composite
def sparse_problems(draw):
    k = draw(st.integers(1, 200))
    return dict(
        k=k,
        n=draw(st.integers(1, 150)),
        sparsity=draw(
            st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999]), st.floats(0, 0.999))
        ),
        method=draw(st.sampled_from(["magnitude", "wanda"])),
        dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )


@given(sparse_problems())
def test_sparsify_and_spmm_match_numpy_and_scipy(p):
    w = np.asarray(normal(p["seed"], (p["k"], p["n"]), p["dtype"]))
    norms = np.random.default_rng(p["seed"]).random(p["k"]) + 0.1
    sw = sparsify(
        w,
        p["sparsity"],
        p["method"],
        activation_norms=norms if p["method"] == "wanda" else None,
    )
    dense = np.asarray(sw.todense().astype(jnp.float32))
    w32 = w.astype(np.float32)
    kept = np.asarray(sw.mask())
    # Per output column: exactly round((1 - s) k) kept, and no pruned score beats a kept one.
    assert (kept.sum(axis=0) == round((1 - p["sparsity"]) * p["k"])).all()
    scores = np.abs(w32) * (norms[:, None] if p["method"] == "wanda" else 1)
    for col in range(p["n"]):
        if kept[:, col].any() and (~kept[:, col]).any():
            assert scores[kept[:, col], col].min() >= scores[~kept[:, col], col].max()
    np.testing.assert_array_equal(dense, np.where(kept, w32, 0))
    x = normal(p["seed"] + 1, (2, 3, p["k"]), p["dtype"])
    got = sparse_matmul(x, sw, implementation="xla")
    csr = scipy.sparse.csr_matrix(dense.astype(np.float64))
    want = (csr.T @ np.asarray(x, np.float64).reshape(-1, p["k"]).T).T.reshape(2, 3, p["n"])
    tol = TOLERANCE[p["dtype"]] * (1 + np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=4 * tol, rtol=0)


@given(
    groups=st.integers(1, 20),
    n=st.integers(1, 70),
    pattern=st.sampled_from(["1:4", "2:4", "4:8", "1:2", "3:3"]),
    seed=st.integers(0, 2**16),
)
def test_n_m_patterns_keep_n_of_every_m(groups, n, pattern, seed):
    keep, m = (int(v) for v in pattern.split(":"))
    w = np.asarray(normal(seed, (groups * m, n)))
    mask = np.asarray(sparsify(w, pattern=pattern).mask()).reshape(groups, m, n)
    assert (mask.sum(axis=1) == keep).all()
    magnitude = np.abs(w).reshape(groups, m, n)
    kept_min = np.where(mask, magnitude, np.inf).min(axis=1)
    pruned_max = np.where(mask, -np.inf, magnitude).max(axis=1)
    assert (kept_min >= pruned_max).all()


@settings(max_examples=MOSAIC_EXAMPLES)
@given(
    m=st.integers(1, 12),
    k=st.integers(1, 200),
    n=st.integers(1, 140),
    sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.95, 0.999]),
    seed=st.integers(0, 2**16),
)
def test_sparse_matmul_mosaic_interpret_matches_scipy(m, k, n, sparsity, seed):
    sw = sparsify(np.asarray(normal(seed, (k, n), jnp.bfloat16)), sparsity)
    x = normal(seed + 1, (m, k), jnp.bfloat16)
    with testing.gpu_interpret():
        got = jax.jit(lambda a: sparse_matmul(a, sw, implementation="mosaic"))(x)
    csr = scipy.sparse.csr_matrix(np.asarray(sw.todense(), np.float64))
    want = (csr.T @ np.asarray(x, np.float64).T).T
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, atol=2e-2 * (1 + np.abs(want).max()), rtol=0
    )
