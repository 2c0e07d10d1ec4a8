"""Sparse x dense matmul benchmark: bitmap-format SpMM vs XLA dense bf16, one run.

    python -m benchmarks.spmm            # GPU: Flash-LLM / OPT and Llama shapes
    python -m benchmarks.spmm --quick    # tiny shapes, any backend

Prints time per call, effective bandwidth (bytes of the stored weight / time),
speedup over dense and the bitmap bandwidth bound ``2 / (2 d + 1/8)``. Times
are device-timed (``benchmarks/timing.py``): every weight copy is one call in
a single jitted dispatch, CUPTI kernel time where available; the copies of
each format move at least 2x the L2 of the device present, sized from that
format's bytes (90%-sparse copies are ~6x smaller than dense ones). Sparse
weights are drawn on the device (``benchmarks/weights.py``: uniformly random
masks, exact count per quarter tile) in milliseconds instead of host pruning.

On Hopper both implementations run: the Mosaic kernel (``mosaic``, its
speedup is the headline) and the XLA path (``xla``: decode to dense, then
dot). Elsewhere only the XLA path runs (the Mosaic column shows ``-``).
``--decode dense|bits`` forces the kernel's tile decode (default: picked by
density, "bits" at <= 25% nonzeros); run both to check that threshold. The
``mosaic`` column fails loudly if the op traced XLA instead.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.weights import random_dense, random_sparse_weight, weight_copies
from pallax.pallas_kernels import sparse_matmul
from pallax.pallas_kernels._dispatch import on_hopper
from pallax.pallas_kernels.sparse_matmul_mgpu import DECODES, SpmmConfig

SHAPES = {
    "opt30b": [(21504, 7168), (7168, 7168), (28672, 7168), (7168, 28672)],
    "opt66b": [(27648, 9216), (9216, 9216), (36864, 9216), (9216, 36864)],
    "opt175b": [(36864, 12288), (12288, 12288), (49152, 12288), (12288, 49152)],
    "llama": [(4096, 4096), (14336, 4096), (4096, 14336)],
}


def run(shapes, tokens, sparsities, iters, decode=None, max_copies=None):
    l2 = timing.l2_bytes()
    print(
        f"# device={timing.device_kind()} jax={jax.__version__} bf16 L2={l2 / 2**20:.0f} MiB"
        f" decode={decode or 'by density'}; us per call"
    )
    print(
        f"{'M(out)':>7}{'K(in)':>7}{'N':>4}{'sparsity':>9}{'dense us':>10}{'mosaic us':>10}"
        f"{'xla us':>9}{'GB/s':>8}{'speedup':>9}{'bound':>7}"
    )
    key = jax.random.key(0)

    def dense_fn(x, w):
        return x @ w

    implementations = ["mosaic", "xla"] if on_hopper() else ["xla"]
    sparse_fns = {
        impl: functools.partial(
            sparse_matmul, implementation=impl, config=SpmmConfig(decode=decode)
        )
        for impl in implementations
    }

    def copies(build):
        nbytes = timing.tree_nbytes(jax.eval_shape(build, key))
        return weight_copies(build, key, timing.rotation_copies(nbytes, l2, max_copies=max_copies))

    rows = []
    for m_out, k_in in shapes:
        dense = copies(functools.partial(random_dense, rows=k_in, cols=m_out))
        for sparsity in sparsities:
            sparse = copies(
                functools.partial(
                    random_sparse_weight, in_features=k_in, out_features=m_out, sparsity=sparsity
                )
            )
            bound = 2 / (2 * (1 - sparsity) + 1 / 8)
            calls = max(len(dense), len(sparse))
            for n in tokens:
                xs = [
                    jax.random.normal(kk, (n, k_in), jnp.bfloat16)
                    for kk in jax.random.split(key, calls)
                ]
                dense_sets = timing.rotating_arg_sets(xs, dense)
                t_dense = timing.time_calls(dense_fn, dense_sets, repeats=iters).seconds
                sparse_sets = timing.rotating_arg_sets(xs, sparse)
                times = {}
                for impl, fn in sparse_fns.items():
                    timing.require_implementation(impl, fn, *sparse_sets[0], what=f"spmm {impl}")
                    times[impl] = timing.time_calls(fn, sparse_sets, repeats=iters).seconds
                best = times.get("mosaic", times["xla"])
                gbps = sparse[0].nbytes / best / 1e9
                mosaic = f"{times['mosaic'] * 1e6:>10.1f}" if "mosaic" in times else f"{'-':>10}"
                print(
                    f"{m_out:>7}{k_in:>7}{n:>4}{sparsity:>9.0%}{t_dense * 1e6:>10.1f}{mosaic}"
                    f"{times['xla'] * 1e6:>9.1f}{gbps:>8.1f}{t_dense / best:>8.2f}x"
                    f"{bound:>6.2f}x",
                    flush=True,
                )
                rows.append((m_out, k_in, n, sparsity, t_dense, times))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--iters", type=int, default=10, help="timed dispatches")
    parser.add_argument("--decode", choices=DECODES, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        return run([(256, 192)], [1, 16], [0.5, 0.9], 2, args.decode, max_copies=3)  # smoke
    shapes = [s for name in args.models for s in SHAPES[name]]
    return run(shapes, [1, 8, 16, 32, 64], [0.5, 0.7, 0.8, 0.9], args.iters, args.decode)


if __name__ == "__main__":
    main()
