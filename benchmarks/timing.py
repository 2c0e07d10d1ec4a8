"""The measuring instrument every benchmark shares.

* :func:`time_calls` times ``len(arg_sets)`` calls of a function inside ONE
  jitted dispatch (one call per argument set, distinct buffers so XLA can
  neither merge nor cache them) and divides by the number of calls. Kernel time
  comes from CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``: the sum of
  the kernels' own durations, launch gaps excluded); end-to-end time is the
  wall clock of the whole dispatch over the calls. Without CUPTI (CPU) only the
  wall clock is reported.
* :func:`rotation_copies` sizes the rotation of weight copies against the L2
  of the device present, from the actual bytes of each weight format.
* :func:`implementation_of` / :func:`require_implementation` say which
  implementation a pallax op really traced (a Pallas kernel or plain XLA), so a
  benchmark that asked for Mosaic and silently got XLA fails instead of
  reporting XLA's time under the kernel's name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time

import jax
import numpy as np

# L2 per device kind (bytes), matched by substring of ``device_kind``. H100:
# 50 MiB; H200: 60 MiB as reported by the CUDA runtime on this workplace's
# H200s (/work/shared/README.md). Unknown GPUs get a generous 128 MiB so the
# rotation errs towards more copies; the CPU value only sizes dry runs.
L2_BYTES_BY_KIND = {"H100": 50 * 2**20, "H200": 60 * 2**20, "H800": 50 * 2**20}
UNKNOWN_GPU_L2_BYTES = 128 * 2**20
CPU_L2_BYTES = 2 * 2**20
L2_ENV = "PALLAX_L2_BYTES"  # set by gpu_proof's environment step from the CUDA runtime
ROTATION_FACTOR = 2  # each timed pass streams at least this many L2s of weights


def device_kind() -> str:
    return jax.devices()[0].device_kind


def l2_bytes(kind: str | None = None) -> int:
    """L2 size of ``kind`` (default: the device present).

    ``$PALLAX_L2_BYTES`` (what the CUDA runtime reported, written by
    ``gpu_proof``'s environment step) wins when it is larger than the table.
    """
    on_device = kind is None
    kind = device_kind() if kind is None else kind
    table = next((v for k, v in L2_BYTES_BY_KIND.items() if k in kind), None)
    if table is None:
        is_cpu = kind.lower() == "cpu" or (on_device and jax.default_backend() == "cpu")
        table = CPU_L2_BYTES if is_cpu else UNKNOWN_GPU_L2_BYTES
    reported = int(os.environ.get(L2_ENV, "0") or 0) if on_device else 0
    return max(table, reported)


def tree_nbytes(tree) -> int:
    """Bytes of every array leaf: what one call streams for a weight of any format
    (dense, :class:`QuantizedWeight` with its scales, :class:`SparseWeight` with
    bitmap and offsets). Works on ``jax.ShapeDtypeStruct`` leaves too."""
    return sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "shape")
    )


def rotation_copies(
    bytes_per_copy: int, l2: int, factor: int = ROTATION_FACTOR, max_copies: int | None = None
) -> int:
    """Copies to cycle through so one pass moves at least ``factor`` x ``l2`` bytes.

    ``max_copies`` caps it for smoke runs on a CPU, where L2 is not the point."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be positive, got {bytes_per_copy}")
    copies = max(2, -(-factor * l2 // bytes_per_copy))
    return min(copies, max_copies) if max_copies else copies


# ----------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call. ``kernel_s``: CUPTI kernel time (None without CUPTI);
    ``e2e_s``: wall time of a dispatch / calls in it; ``dispatches``: how many
    times the jitted program ran (warm-up included)."""

    kernel_s: float | None
    e2e_s: float
    calls: int
    dispatches: int
    method: str

    @property
    def seconds(self) -> float:
        """The headline figure: kernel time where CUPTI measured it."""
        return self.kernel_s if self.kernel_s is not None else self.e2e_s

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "seconds": self.seconds}


def _cupti_measure():
    """``profiler.measure`` if CUPTI can run here (a CUDA backend), else None."""
    if jax.default_backend() != "gpu" or os.environ.get("PALLAX_NO_CUPTI"):
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler
    except Exception:  # noqa: BLE001 - no Mosaic GPU runtime: wall clock only
        return None
    return profiler.measure


def calls_program(fn):
    """One jitted program that runs ``fn(*args)`` for every ``args`` in a list."""
    return jax.jit(lambda arg_sets: [fn(*args) for args in arg_sets])


def time_calls(fn, arg_sets, *, repeats: int = 5) -> Timing:
    """Times ``fn`` over ``arg_sets`` (a list of argument tuples), all calls in
    one dispatch; returns per-call seconds (median over ``repeats`` dispatches).

    Give every call its own buffers (different weights or activations): equal
    arguments could be merged by XLA, and a weight read twice may come from L2.
    """
    if not arg_sets:
        raise ValueError("time_calls needs at least one argument set")
    program = calls_program(fn)
    calls = len(arg_sets)
    dispatches = 1
    jax.block_until_ready(program(arg_sets))  # compile + warm-up
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(arg_sets))
        walls.append(time.perf_counter() - start)
        dispatches += 1
    e2e = statistics.median(walls) / calls
    measure = _cupti_measure()
    kernel, method = None, "wall"
    if measure is not None:
        try:
            _, ms = measure(program, iterations=repeats)(arg_sets)
            dispatches += repeats + 1  # measure warms up once itself
            if ms:
                ms = ms if isinstance(ms, list) else [ms]
                kernel, method = statistics.median(ms) / 1e3 / calls, "cupti"
        except Exception as e:  # noqa: BLE001 - keep the wall clock, say why
            method = f"wall (cupti failed: {type(e).__name__})"
    return Timing(kernel, e2e, calls, dispatches, method)


def rotating_arg_sets(xs, weights):
    """``[(x_i, w_i)]``: one call per weight copy, each with its own input.

    No operand is shared between calls: XLA merges dots that share an operand
    (``DotMerger``), which would read a shared weight once for several calls.
    """
    if len(xs) < len(weights):
        raise ValueError(
            f"{len(weights)} weight copies need {len(weights)} distinct inputs, got {len(xs)}"
        )
    return list(zip(xs, weights, strict=False))


def time_rotating(fn, xs, weights, iters: int = 5) -> Timing:
    """``fn(x_i, w_i)`` over every copy in ``weights`` inside one dispatch (see
    :func:`time_calls`); ``xs`` holds one distinct input per copy."""
    return time_calls(fn, rotating_arg_sets(xs, weights), repeats=iters)


# ----------------------------------------------------------------------------
# Which implementation ran


class ImplementationMismatch(RuntimeError):
    """A benchmark asked for one implementation and the op traced another."""


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _primitive_names(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                yield from _primitive_names(sub)


# Primitives only a Pallas kernel traces: the kernel call itself (``pallas_call``;
# ``plgpu.kernel`` traces ``mpmd_map``/``core_map`` in jax 0.11) and Mosaic GPU's
# own memory ops.
KERNEL_PRIMITIVES = frozenset(
    {"pallas_call", "mpmd_map", "core_map", "copy_gmem_to_smem", "copy_smem_to_gmem"}
)


def implementation_of(fn, *args) -> str:
    """``"mosaic"`` if tracing ``fn(*args)`` reaches a Pallas kernel, else ``"xla"``.

    Reads the traced program, so it sees what ``implementation=None`` resolved
    to on this device, including a fallback after a failed self-check.
    """
    closed = jax.make_jaxpr(fn)(*args)
    return "mosaic" if KERNEL_PRIMITIVES & set(_primitive_names(closed.jaxpr)) else "xla"


def require_implementation(expected: str | None, fn, *args, what: str = "benchmark") -> str:
    """The implementation ``fn(*args)`` traces; raises :class:`ImplementationMismatch`
    if ``expected`` (``"mosaic"``/``"xla"``) was asked and another one traced."""
    got = implementation_of(fn, *args)
    if expected is not None and got != expected:
        raise ImplementationMismatch(
            f"{what}: asked for implementation={expected!r} but the traced program runs "
            f"{got!r} (a silent fallback would report {got}'s time under {expected}'s name)"
        )
    return got
