"""Quantized matmul benchmark: W4A16 / W8A16 / W8A8 vs XLA bf16 and int8 dots, one run.

    python -m benchmarks.quant_matmul            # GPU: full table
    python -m benchmarks.quant_matmul --quick    # tiny shapes, any backend

Times are per call, device-timed (``benchmarks/timing.py``): every weight copy
is one call inside a single jitted dispatch, the copies of each format moving
at least 2x the L2 of the device present (sized from that format's own bytes:
an int4 4096x14336 weight is a quarter of its bf16 size), with CUPTI kernel
time where available. Speedups are relative to XLA bf16 ``x @ w`` in the same
run. ``jaxmixed`` is jax's ``hopper_mixed_type_matmul_mgpu`` (int8 x bf16, no
scales: a lower bound for W8A16), with M padded to its 64-wide tile. The
pallax columns run ``implementation=None`` and fail if that did not trace the
Mosaic kernel on a Hopper GPU.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.weights import random_dense, random_quantized_weight, weight_copies
from pallax.pallas_kernels import quantized_matmul
from pallax.pallas_kernels._dispatch import on_hopper


def jax_mixed_matmul():
    """jax's hopper_mixed_type_matmul_mgpu (int8 x bf16, no scales) as
    ``fn(x [M, K], w_t int8 [N, K]) -> [M, N]`` (``y^T = w_t @ x^T``), or None.

    Its warpgroups split the weight's rows (``wg_dimension=M``), so the token
    side only needs padding to the 64-wide ``tile_n``: M = 1..64 run as one
    tile (with the default split on N it would need multiples of 128).
    """
    try:
        from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed
    except ImportError:
        return None
    config = mixed.TuningConfig(
        tile_m=128,
        tile_n=64,
        tile_k=128,
        max_concurrent_steps=4,
        epi_tile_n=64,
        epi_tile_m=64,
        wg_dimension=mixed.MatmulDimension.M,
    )

    def fn(x, w_t):
        m = x.shape[0]
        x_t = jnp.pad(x, ((0, -m % config.tile_n), (0, 0))).T
        out = mixed.mixed_matmul_kernel(w_t, x_t, out_dtype=jnp.bfloat16, config=config)
        return out[:, :m].T

    return fn


def _copies(build, key, l2, max_copies=None):
    """Copies of ``build(key)`` moving >= 2x L2, sized from the format's own bytes."""
    nbytes = timing.tree_nbytes(jax.eval_shape(build, key))
    return weight_copies(build, key, timing.rotation_copies(nbytes, l2, max_copies=max_copies))


def _bf16(x, w):
    return x @ w


def _int8dot(xq, w_t):
    return jax.lax.dot_general(xq, w_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def run(ms, shapes, iters, on_gpu, max_copies=None):
    expected = "mosaic" if on_gpu else "xla"  # what implementation=None must pick
    l2 = timing.l2_bytes()
    print(
        f"# device={timing.device_kind()} jax={jax.__version__} L2={l2 / 2**20:.0f} MiB "
        f"pallax implementation=None (expected {expected}); us per call"
    )
    cols = ["bf16", "int8dot", "jaxmixed", "w8a16", "w4a16", "w8a8"]
    print(
        f"{'M':>6}{'K':>7}{'N':>7}"
        + "".join(f"{c + ' us':>12}" for c in cols)
        + "".join(f"{c + ' x':>12}" for c in cols[2:])
    )
    rows = []
    mixed = jax_mixed_matmul() if on_gpu else None
    key = jax.random.key(0)
    for k, n in shapes:
        dense = _copies(functools.partial(random_dense, rows=k, cols=n), key, l2, max_copies)
        q8, q4 = (
            _copies(
                functools.partial(random_quantized_weight, in_features=k, out_features=n, bits=b),
                key,
                l2,
                max_copies,
            )
            for b in (8, 4)
        )
        int8_t = [q.values[:n, :k] for q in q8]  # [N, K] int8
        calls = max(len(dense), len(q8), len(q4))
        for m in ms:
            xs = [
                jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(key, calls)
            ]
            pallax = {
                "w8a16": (lambda x, w: quantized_matmul(x, w), q8),
                "w4a16": (lambda x, w: quantized_matmul(x, w), q4),
                "w8a8": (lambda x, w: quantized_matmul(x, w, act_bits=8), q8),
            }
            fns = {
                "bf16": (_bf16, xs, dense),
                "int8dot": (_int8dot, [x.astype(jnp.int8) for x in xs], int8_t),
                "jaxmixed": (mixed, xs, int8_t),
                **{name: (fn, xs, ws) for name, (fn, ws) in pallax.items()},
            }
            times = {}
            for name, (fn, inputs, weights) in fns.items():
                if fn is None:
                    continue  # jax's mixed-type kernel needs a Hopper GPU.
                arg_sets = timing.rotating_arg_sets(inputs, weights)
                if name in pallax:
                    timing.require_implementation(expected, fn, *arg_sets[0], what=name)
                try:
                    times[name] = timing.time_calls(fn, arg_sets, repeats=iters).seconds
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            line = f"{m:>6}{k:>7}{n:>7}"
            line += "".join(
                f"{times[c] * 1e6:>12.1f}" if c in times else f"{'-':>12}" for c in cols
            )
            line += "".join(
                f"{times['bf16'] / times[c]:>11.2f}x" if c in times else f"{'-':>12}"
                for c in cols[2:]
            )
            print(line, flush=True)
            rows.append((m, k, n, times))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=10, help="timed dispatches")
    args = parser.parse_args(argv)
    on_gpu = on_hopper()
    if args.quick:
        return run([1, 16], [(256, 384)], 2, on_gpu, max_copies=3)  # smoke run
    ms = [1, 16, 32, 64, 128, 256, 4096]
    shapes = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]
    return run(ms, shapes, args.iters, on_gpu)


if __name__ == "__main__":
    main()
