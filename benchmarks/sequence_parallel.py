"""Sequence parallelism for a sliding window: halo exchange vs ring vs Ulysses.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m benchmarks.sequence_parallel          # CPU: bytes + CPU timings
    python -m benchmarks.sequence_parallel              # GPU: all local GPUs

For each method: bytes each device receives per forward (counted from the
compiled HLO's collective-permute / all-to-all ops, and the analytic formula)
and the fwd+bwd step time on the available devices.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from pallax import sharding as ps
from pallax.sharding import parallel

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1}
_COLLECTIVE = re.compile(r"= (.*?) (collective-permute-start|collective-permute|all-to-all)\(")
_BUFFER = re.compile(r"\b(f32|bf16|f16|s32|pred)\[([\d,]*)\]")


def hlo_collective_bytes(hlo_text: str, num_shards: int) -> int:
    """Bytes received per device by collective-permutes and all-to-alls in an HLO module."""
    total = 0
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        result_type, op = match.groups()
        size = sum(
            _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
            for dtype, dims in _BUFFER.findall(result_type)
        )
        if op == "collective-permute-start":  # (operand, result, ...) buffers.
            size //= 2
        total += (
            size if op.startswith("collective-permute") else size * (num_shards - 1) // num_shards
        )
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    sp = jax.device_count()
    seq = args.seq or (32768 if on_gpu else 4096)
    window = args.window or (4096 if on_gpu else 256)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    b, h, kh, d = args.batch, args.heads, args.kv_heads, args.head_dim
    print(
        f"# {jax.devices()[0].device_kind} x{sp}, jax {jax.__version__}: seq={seq} "
        f"window={window} batch={b} heads={h}/{kh} head_dim={d} {jnp.dtype(dtype).name}"
    )
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, seq, h, d), dtype)
    k = jax.random.normal(keys[1], (b, seq, kh, d), dtype)
    v = jax.random.normal(keys[2], (b, seq, kh, d), dtype)
    mesh = ps.make_mesh(data=1, sequence=sp)
    analytic = {
        "halo": parallel.halo_bytes(b, seq, kh, d, itemsize, window, sp),
        "ring": parallel.ring_bytes(b, seq, kh, d, itemsize, window, sp),
        "ulysses": parallel.ulysses_bytes(b, seq, h, kh, d, itemsize, sp),
    }
    print(f"{'method':<9}{'HLO MB/dev':>12}{'formula MB':>12}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    results = {}
    with jax.set_mesh(mesh):
        args_sharded = jax.device_put((q, k, v), NamedSharding(mesh, parallel.HEADS))
        for method in ("halo", "ring", "ulysses"):
            attend = functools.partial(
                ps.attention, is_causal=True, local_window_size=window, sequence_method=method
            )
            fwd = jax.jit(attend)
            grad = jax.jit(
                jax.grad(
                    lambda q, k, v, f=attend: f(q, k, v).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2),
                )
            )
            hlo = fwd.lower(*args_sharded).compile().as_text()
            moved = hlo_collective_bytes(hlo, sp)
            times = []
            for fn in (fwd, grad):
                jax.block_until_ready(fn(*args_sharded))
                samples = []
                for _ in range(args.iters):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*args_sharded))
                    samples.append(time.perf_counter() - start)
                times.append(statistics.median(samples))
            results[method] = (moved, times)
            print(
                f"{method:<9}{moved / 2**20:>12.2f}{analytic[method] / 2**20:>12.2f}"
                f"{times[0] * 1e3:>10.2f}{times[1] * 1e3:>12.2f}",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
