"""The README's main job until the model lands: windowed attention end to end.

On any machine: checks pallax attention (forward and gradients) against
``jax.nn.dot_product_attention`` on the embedded default shapes, shows how the
kernels' work shrinks with the window, and times pallax against jax.nn. On a
Hopper GPU the Mosaic kernels run; elsewhere the XLA path does.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallax.pallas_kernels import AttentionConfig, decode_attention, dot_product_attention
from pallax.pallas_kernels.attention import on_hopper
from pallax.pallas_kernels.attention_mgpu import Window, _block_range

# Embedded default: a Mistral-like layer (GQA 4:1, head_dim 64) at a CPU-sized length.
DEFAULT = dict(batch=1, seq=1024, heads=8, kv_heads=2, head_dim=64)
WINDOWS = (None, 256, 64)


def _timed(fn, *args, iters=3):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / iters


def kv_blocks_visited(seq: int, left: int, config: AttentionConfig) -> int:
    window = Window(left=left, right=0, q_len=seq, kv_len=seq)
    rows = config.q_rows_per_cta
    lo, hi = jax.vmap(lambda s: _block_range(*window.key_range(s, rows), config.block_kv))(
        jnp.arange(0, seq, rows)
    )
    return int((hi - lo).sum())


def main(seq: int | None = None) -> None:
    shape = dict(DEFAULT, seq=seq or DEFAULT["seq"])
    b, s, h, kh, d = (shape[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    impl = "mosaic" if on_hopper() else "xla"
    dtype = jnp.bfloat16
    print(
        f"pallax demo: windowed attention on {jax.devices()[0].device_kind} "
        f"(implementation={impl}), jax {jax.__version__}"
    )
    print(f"shapes: query [{b}, {s}, {h}, {d}], key/value [{b}, {s}, {kh}, {d}], {dtype.__name__}")
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), dtype)
    k = jax.random.normal(keys[1], (b, s, kh, d), dtype)
    v = jax.random.normal(keys[2], (b, s, kh, d), dtype)
    config = AttentionConfig.for_head_dim(d)
    full_blocks = kv_blocks_visited(s, 2 * s, config)
    print(
        f"\n{'window':>8} {'max |err| out':>14} {'max |err| dq':>13} {'kv blocks':>10} "
        f"{'pallax ms':>10} {'jax.nn ms':>10}"
    )
    for window in WINDOWS:
        ours = functools.partial(
            dot_product_attention, is_causal=True, local_window_size=window, implementation=impl
        )
        ref = functools.partial(
            jax.nn.dot_product_attention,
            is_causal=True,
            local_window_size=None if window is None else (window, 0),
        )

        def grad_q(attend):
            # k, v are arguments, not closure constants XLA would try to fold.
            return jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()))

        out_err = float(jnp.abs(ours(q, k, v).astype(jnp.float32) - ref(q, k, v)).max())
        dq_err = float(jnp.abs(grad_q(ours)(q, k, v) - grad_q(ref)(q, k, v)).max())
        blocks = kv_blocks_visited(s, window if window is not None else 2 * s, config)
        t_ours = _timed(jax.jit(ours), q, k, v)
        t_ref = _timed(jax.jit(ref), q, k, v)
        name = "causal" if window is None else str(window)
        print(
            f"{name:>8} {out_err:>14.4f} {dq_err:>13.4f} {blocks:>5}/{full_blocks:<4} "
            f"{t_ours * 1e3:>10.2f} {t_ref * 1e3:>10.2f}"
        )

    # Generation step: 1 new token against a rolling cache holding the last 256.
    ring, lengths = 320, jnp.array([s], jnp.int32)
    k_ring = jnp.zeros((b, ring, kh, d), dtype).at[:, jnp.arange(s) % ring].set(k)
    v_ring = jnp.zeros((b, ring, kh, d), dtype).at[:, jnp.arange(s) % ring].set(v)
    step = decode_attention(
        q[:, -1:], k_ring, v_ring, lengths, local_window_size=256, rolling=True, implementation=impl
    )
    full = dot_product_attention(
        q, k, v, is_causal=True, local_window_size=256, implementation=impl
    )[:, -1:]
    err = float(jnp.abs(step.astype(jnp.float32) - full.astype(jnp.float32)).max())
    print(
        f"\ndecode (rolling cache of {ring} slots, window 256) vs full forward: max |err| {err:.4f}"
    )
    ok = np.isfinite(err) and err < 0.05
    print("demo", "OK" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)
