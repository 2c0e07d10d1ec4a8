"""Sparse x dense matmul benchmark: bitmap-format SpMM vs XLA dense bf16, one run.

    python -m benchmarks.spmm            # GPU: Flash-LLM / OPT and Llama shapes
    python -m benchmarks.spmm --quick    # tiny shapes, any backend

Prints time, effective bandwidth (bytes of the stored weight / time), speedup
over dense and the bitmap bandwidth bound ``2 / (2 d + 1/8)``. Weights rotate
over enough copies to exceed the 50 MB L2 of an H100.

On Hopper both implementations run: the Mosaic kernel (``mosaic``, its
speedup is the headline) and the XLA path (``xla``: decode to dense, then
dot). Elsewhere only the XLA path runs (the Mosaic column shows ``-``).
``--decode dense|bits`` forces the kernel's tile decode (default: picked by
density, "bits" at <= 25% nonzeros); run both to check that threshold.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import L2_BYTES, time_rotating
from pallax.pallas_kernels import sparse_matmul, sparsify
from pallax.pallas_kernels._dispatch import on_hopper
from pallax.pallas_kernels.sparse_matmul_mgpu import DECODES, SpmmConfig

SHAPES = {
    "opt30b": [(21504, 7168), (7168, 7168), (28672, 7168), (7168, 28672)],
    "opt66b": [(27648, 9216), (9216, 9216), (36864, 9216), (9216, 36864)],
    "opt175b": [(36864, 12288), (12288, 12288), (49152, 12288), (12288, 49152)],
    "llama": [(4096, 4096), (14336, 4096), (4096, 14336)],
}


def run(shapes, tokens, sparsities, iters, decode=None):
    print(
        f"# device={jax.devices()[0].device_kind} jax={jax.__version__} bf16"
        f" decode={decode or 'by density'}"
    )
    print(
        f"{'M(out)':>7}{'K(in)':>7}{'N':>4}{'sparsity':>9}{'dense us':>10}{'mosaic us':>10}"
        f"{'xla us':>9}{'GB/s':>8}{'speedup':>9}{'bound':>7}"
    )
    rng = np.random.default_rng(0)
    dense_fn = jax.jit(lambda x, w: x @ w)
    implementations = ["mosaic", "xla"] if on_hopper() else ["xla"]
    sparse_fns = {
        impl: jax.jit(
            functools.partial(sparse_matmul, implementation=impl, config=SpmmConfig(decode=decode))
        )
        for impl in implementations
    }
    rows = []
    for m_out, k_in in shapes:
        copies = max(2, -(-2 * L2_BYTES // (m_out * k_in * 2)))
        dense = [
            jnp.asarray(rng.standard_normal((k_in, m_out)), jnp.bfloat16) for _ in range(copies)
        ]
        for sparsity in sparsities:
            sparse = [sparsify(w, sparsity) for w in dense]
            bound = 2 / (2 * (1 - sparsity) + 1 / 8)
            for n in tokens:
                x = jnp.asarray(rng.standard_normal((n, k_in)), jnp.bfloat16)
                t_dense = time_rotating(dense_fn, x, dense, iters)
                times = {
                    impl: time_rotating(fn, x, sparse, iters) for impl, fn in sparse_fns.items()
                }
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
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--decode", choices=DECODES, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        return run([(256, 192)], [1, 16], [0.5, 0.9], 2, args.decode)
    shapes = [s for name in args.models for s in SHAPES[name]]
    return run(shapes, [1, 8, 16, 32, 64], [0.5, 0.7, 0.8, 0.9], args.iters, args.decode)


if __name__ == "__main__":
    main()
