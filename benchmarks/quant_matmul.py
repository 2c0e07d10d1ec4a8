"""Quantized matmul benchmark: W4A16 / W8A16 / W8A8 vs XLA bf16 and int8 dots, one run.

    python -m benchmarks.quant_matmul            # GPU: full table
    python -m benchmarks.quant_matmul --quick    # tiny shapes, any backend

Weights are rotated over enough copies to exceed the 50 MB L2 of an H100, so
every call streams its weight from HBM. Speedups are relative to XLA bf16
``jnp.dot`` measured in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import L2_BYTES, time_rotating
from pallax.pallas_kernels import quantize, quantized_matmul


def _mixed_type_baseline():
    """jax's hopper_mixed_type_matmul_mgpu (int8 x bf16, no scales), if importable."""
    try:
        from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as m
    except ImportError:
        return None
    return m


def _jax_mixed_fn():
    """y^T = W_int8^T [N, K] @ x^T [K, M] with jax's mixed-type kernel (no scales)."""
    module = _mixed_type_baseline()
    config = module.TuningConfig(
        tile_m=128,
        tile_n=64,
        tile_k=128,
        max_concurrent_steps=4,
        epi_tile_n=64,
        epi_tile_m=64,
    )

    def fn(x, w_t):
        m = x.shape[0]
        x_t = jnp.pad(x, ((0, -m % 64), (0, 0))).T
        return module.mixed_matmul_kernel(w_t, x_t, out_dtype=jnp.bfloat16, config=config)

    return jax.jit(fn)


def run(ms, shapes, iters, on_gpu):
    impl = "mosaic" if on_gpu else "xla"
    print(f"# device={jax.devices()[0].device_kind} jax={jax.__version__} implementation={impl}")
    cols = ["bf16", "int8dot", "jaxmixed", "w8a16", "w4a16", "w8a8"]
    print(
        f"{'M':>6}{'K':>7}{'N':>7}"
        + "".join(f"{c + ' us':>12}" for c in cols)
        + "".join(f"{c + ' x':>12}" for c in cols[2:])
    )
    rows = []
    rng = np.random.default_rng(0)
    for k, n in shapes:
        copies = max(2, -(-2 * L2_BYTES // (k * n * 2)))
        dense = [
            jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16) for _ in range(copies)
        ]
        q8 = [quantize(w.astype(jnp.float32), bits=8) for w in dense]
        q4 = [quantize(w.astype(jnp.float32), bits=4) for w in dense]
        int8_t = [q.values[:n, :k] for q in q8]  # [N, K] int8
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
            fns = {
                "bf16": (jax.jit(lambda x, w: x @ w), x, dense),
                "int8dot": (
                    jax.jit(
                        lambda x, w: jax.lax.dot_general(
                            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
                        )
                    ),
                    xq,
                    int8_t,
                ),
                "jaxmixed": (_jax_mixed_fn() if on_gpu else None, x, int8_t),
                "w8a16": (jax.jit(lambda x, w: quantized_matmul(x, w, implementation=impl)), x, q8),
                "w4a16": (jax.jit(lambda x, w: quantized_matmul(x, w, implementation=impl)), x, q4),
                "w8a8": (
                    jax.jit(lambda x, w: quantized_matmul(x, w, act_bits=8, implementation=impl)),
                    x,
                    q8,
                ),
            }
            times = {}
            for name, (fn, xs, ws) in fns.items():
                if fn is None:
                    continue  # jax's mixed-type kernel needs a Hopper GPU.
                try:
                    times[name] = time_rotating(fn, xs, ws, iters)
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
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        return run([1, 16], [(256, 384)], 2, on_gpu)
    ms = [1, 16, 32, 64, 128, 256, 4096]
    shapes = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]
    return run(ms, shapes, args.iters, on_gpu)


if __name__ == "__main__":
    main()
