"""Windowed attention benchmark: pallax Mosaic kernel vs cuDNN and XLA, one run.

    python -m benchmarks.attention                 # GPU: full table (bf16, head_dim 128)
    python -m benchmarks.attention --quick         # tiny shapes, any backend (smoke test)

TFLOP/s count only unmasked work: 4 * head_dim * heads * batch * (visible
query-key pairs) for the forward, 2.5x that for the backward. The number of
tokens per step is held at ``--tokens`` (batch = tokens / seq) so every shape
moves more than the 50 MB L2 of an H100.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallax.pallas_kernels import dot_product_attention
from pallax.pallas_kernels.attention import normalize_window

DEFAULT_WINDOWS = (0, 4096, 1024)  # None: full causal.


def visible_pairs(seq: int, left: int, right: int) -> int:
    i = np.arange(seq)
    return int((np.minimum(i + right, seq - 1) - np.maximum(i - left, 0) + 1).clip(0).sum())


def time_fn(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median wall time in seconds of ``fn(*args)`` (already jitted)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def implementations(on_gpu: bool) -> dict:
    def pallax_impl(q, k, v, window):
        return dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            local_window_size=window,
            implementation="mosaic" if on_gpu else "xla",
        )

    def jax_nn(impl):
        def run(q, k, v, window):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                local_window_size=None if window is None else (window, 0),
                implementation=impl,
            )

        return run

    impls = {"pallax": pallax_impl, "xla": jax_nn("xla")}
    if on_gpu:
        impls["cudnn"] = jax_nn("cudnn")
    return impls


def run(seqs, windows, tokens, heads, kv_heads, head_dim, iters, modes, baseline_xla_max_seq):
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    impls = implementations(on_gpu)
    print(
        f"# device={device} jax={jax.__version__} bf16 head_dim={head_dim} "
        f"heads={heads}/{kv_heads} tokens/step={tokens}"
    )
    header = (
        f"{'mode':<8}{'seq':>7}{'window':>8}"
        + "".join(f"{name + ' ms':>12}{name + ' TF/s':>12}" for name in impls)
        + f"{'vs cudnn':>10}{'vs xla':>9}"
    )
    print(header)
    rows = []
    for mode in modes:
        for seq in seqs:
            batch = max(1, tokens // seq)
            key = jax.random.split(jax.random.key(0), 4)
            q = jax.random.normal(key[0], (batch, seq, heads, head_dim), jnp.bfloat16)
            k = jax.random.normal(key[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
            v = jax.random.normal(key[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
            for window in windows:
                wname = "causal" if window is None else f"w{window}"
                if window is not None and window >= seq:
                    continue
                left, right = normalize_window(True, window, seq, seq)
                flops = 4 * head_dim * heads * batch * visible_pairs(seq, left, right)
                if mode == "fwd+bwd":
                    flops = int(flops * 3.5)
                result = {}
                for name, impl in impls.items():
                    if name == "xla" and seq > baseline_xla_max_seq:
                        continue  # Materialises seq^2 logits.
                    fn = functools.partial(impl, window=window)
                    if mode == "fwd":
                        step = jax.jit(fn)
                    else:
                        step = jax.jit(
                            jax.grad(
                                lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2),
                            )
                        )
                    try:
                        seconds = time_fn(step, q, k, v, iters=iters)
                    except Exception as e:  # noqa: BLE001 - report and go on.
                        print(
                            f"  {name} failed at seq={seq} {wname}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}"
                        )
                        continue
                    result[name] = seconds
                line = f"{mode:<8}{seq:>7}{wname:>8}"
                for name in impls:
                    if name in result:
                        line += f"{result[name] * 1e3:>12.3f}{flops / result[name] / 1e12:>12.1f}"
                    else:
                        line += f"{'-':>12}{'-':>12}"
                for base in ("cudnn", "xla"):
                    ratio = (
                        (result[base] / result["pallax"])
                        if (base in result and "pallax" in result)
                        else None
                    )
                    line += f"{ratio:>9.2f}x" if ratio else f"{'-':>10}"
                print(line, flush=True)
                rows.append((mode, seq, wname, result, flops))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 iterations")
    parser.add_argument(
        "--seqs", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    parser.add_argument(
        "--windows",
        type=int,
        nargs="*",
        default=list(DEFAULT_WINDOWS),
        help="left windows; 0 means full causal",
    )
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    parser.add_argument("--xla-max-seq", type=int, default=8192)
    args = parser.parse_args(argv)
    args.windows = [w or None for w in args.windows]
    if args.quick:
        args.seqs, args.tokens, args.heads, args.kv_heads = [256, 2048], 2048, 4, 2
        args.head_dim, args.iters, args.windows = 64, 2, [None, 1024, 128]
    return run(
        args.seqs,
        args.windows,
        args.tokens,
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.iters,
        args.modes,
        args.xla_max_seq,
    )


if __name__ == "__main__":
    main()
