"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax

L2_BYTES = 50 * 2**20  # H100 L2; weights are rotated over enough copies to exceed it.


def time_rotating(fn, x, weights, iters: int) -> float:
    """Median seconds of ``fn(x, w)``, cycling through ``weights`` so none stays in L2."""
    for w in weights[:2]:
        jax.block_until_ready(fn(x, w))
    samples = []
    for i in range(iters):
        w = weights[i % len(weights)]
        start = time.perf_counter()
        jax.block_until_ready(fn(x, w))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
