"""Windowed attention benchmark: pallax Mosaic kernel vs cuDNN, jax's own Mosaic
kernel and XLA, one run.

    python -m benchmarks.attention                 # GPU: full table (bf16, head_dim 128)
    python -m benchmarks.attention --quick         # tiny shapes, any backend (smoke test)

Times are per call, device-timed (``benchmarks/timing.py``): ``--calls``
calls with distinct query buffers run inside one jitted dispatch; the kernel
time is CUPTI's (the wall clock of the dispatch / calls without CUPTI).
``jax_mosaic`` is ``jax.experimental.pallas.ops.gpu.attention_mgpu`` (fp16,
causal forward, no window: at a window it runs full causal, the cost a JAX
user pays without windowed kernels; it has no causal backward). The pallax
column runs ``implementation=None`` and fails if that did not trace the
Mosaic kernel on a Hopper GPU.

TFLOP/s count only unmasked work: 4 * head_dim * heads * batch * (visible
query-key pairs) for the forward, 2.5x that for the backward. The number of
tokens per step is held at ``--tokens`` (batch = tokens / seq).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import ImplementationMismatch, require_implementation, time_calls
from pallax.pallas_kernels import dot_product_attention
from pallax.pallas_kernels._dispatch import on_hopper
from pallax.pallas_kernels.attention import normalize_window

DEFAULT_WINDOWS = (0, 4096, 1024)  # None: full causal.


def visible_pairs(seq: int, left: int, right: int) -> int:
    i = np.arange(seq)
    return int((np.minimum(i + right, seq - 1) - np.maximum(i - left, 0) + 1).clip(0).sum())


def jax_mosaic_attention():
    """jax's Mosaic attention (fp16, causal forward only, no window), or None."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as jax_mgpu
    except ImportError:
        return None

    def run(q, k, v, window):
        del window  # It has none: full causal.
        config = jax_mgpu.TuningConfig(
            block_q=64, block_kv=128, max_concurrent_steps=2, causal=True
        )
        return jax_mgpu.attention(q, k, v, config)

    return run


def implementations(on_gpu: bool) -> dict:
    def pallax_impl(q, k, v, window):
        return dot_product_attention(q, k, v, is_causal=True, local_window_size=window)

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
        if (jax_mosaic := jax_mosaic_attention()) is not None:
            impls["jax_mosaic"] = jax_mosaic
    return impls


def run(
    seqs, windows, tokens, heads, kv_heads, head_dim, iters, modes, baseline_xla_max_seq, calls=3
):
    on_gpu = on_hopper()
    expected = "mosaic" if on_gpu else "xla"  # what implementation=None must pick
    device = jax.devices()[0].device_kind
    impls = implementations(on_gpu)
    print(
        f"# device={device} jax={jax.__version__} bf16 head_dim={head_dim} "
        f"heads={heads}/{kv_heads} tokens/step={tokens}"
    )
    header = (
        f"{'mode':<8}{'seq':>7}{'window':>8}"
        + "".join(f"{name + ' ms':>12}{name + ' TF/s':>12}" for name in impls)
        + "".join(f"{'vs ' + b:>12}" for b in ("cudnn", "jax_mosaic", "xla"))
    )
    print(header)
    rows = []
    for mode in modes:
        for seq in seqs:
            batch = max(1, tokens // seq)
            # Every call gets its own q, k and v (XLA may merge dots sharing an operand).
            keys = jax.random.split(jax.random.key(0), (calls, 3))
            qkvs = [
                tuple(
                    jax.random.normal(kk, (batch, seq, h, head_dim), jnp.bfloat16)
                    for kk, h in zip(call_keys, (heads, kv_heads, kv_heads), strict=True)
                )
                for call_keys in keys
            ]
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
                    if name == "jax_mosaic" and mode != "fwd":
                        continue  # No causal backward in jax's kernel.
                    fn = functools.partial(impl, window=window)
                    if mode == "fwd":
                        step = fn
                    else:
                        step = jax.grad(
                            lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                            argnums=(0, 1, 2),
                        )
                    dtype = jnp.float16 if name == "jax_mosaic" else jnp.bfloat16
                    arg_sets = [tuple(a.astype(dtype) for a in qkv) for qkv in qkvs]
                    try:
                        if name == "pallax":
                            got = require_implementation(expected, step, *arg_sets[0])
                            if mode == modes[0] and seq == seqs[0] and window == windows[0]:
                                print(f"# pallax traced implementation={got}")
                        seconds = time_calls(step, arg_sets, repeats=iters).seconds
                    except ImplementationMismatch:
                        raise  # A silent fallback must not be reported as the kernel's time.
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
                for base in ("cudnn", "jax_mosaic", "xla"):
                    ratio = (
                        (result[base] / result["pallax"])
                        if (base in result and "pallax" in result)
                        else None
                    )
                    line += f"{ratio:>11.2f}x" if ratio else f"{'-':>12}"
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
    parser.add_argument("--iters", type=int, default=10, help="timed dispatches")
    parser.add_argument("--calls", type=int, default=3, help="calls per dispatch")
    parser.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    parser.add_argument("--xla-max-seq", type=int, default=8192)
    args = parser.parse_args(argv)
    args.windows = [w or None for w in args.windows]
    if args.quick:
        args.seqs, args.tokens, args.heads, args.kv_heads = [256, 2048], 2048, 4, 2
        args.head_dim, args.iters, args.windows = 64, 2, [None, 1024, 128]
        args.calls = 2
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
        args.calls,
    )


if __name__ == "__main__":
    main()
