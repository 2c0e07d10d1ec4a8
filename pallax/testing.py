"""Run and lower Mosaic GPU kernels on a machine without a GPU.

* :func:`gpu_interpret` runs kernels in Pallas' GPU interpret mode (simulated
  SMEM, TMA, barriers and wgmma on the CPU, optionally detecting races).
* :func:`lower_for_cuda` runs the full Mosaic GPU lowering for CUDA through
  ``jax.export``, so unsupported ops, bad tile shapes and shared-memory
  overflow are caught on CPU.

jax 0.11.2's interpreter has no TMA reductions (``copy_smem_to_gmem(...,
reduction_op=...)``, ``cp.reduce.async.bulk``). Importing this module teaches
it ``"add"``, ``"min"`` and ``"max"``: the destination window is read, combined
with the SMEM source and written back under one lock, so concurrent CTAs
reducing into the same GMEM tile behave as the hardware's L2 atomics do (in
some order, each update whole). Under ``detect_races`` such reductions into
one window do not race with each other (they commute), only with unordered
plain reads and writes of it.

Both pretend to be an H100 through an abstract mesh; kernels must not query the
real device at trace time.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import numpy as np
from jax._src import source_info_util
from jax._src.pallas.mosaic.interpret.race_detection_state import _ranges_overlap
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.params import (
    InterpretGPUParams,
    force_gpu_interpret_mode,
)

H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
H100_NUM_SMS = 132


def h100_abstract_mesh(axis_sizes: dict[str, int] | None = None) -> jax.sharding.AbstractMesh:
    """An abstract mesh of H100s (no devices needed); ``None`` gives the 0-d mesh."""
    device = jax.sharding.AbstractDevice(
        device_kind=H100_DEVICE_KIND, platform="gpu", num_cores=H100_NUM_SMS
    )
    sizes = axis_sizes or {}
    return jax.sharding.AbstractMesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
        abstract_device=device,
    )


def _h100_mesh(mesh: jax.sharding.AbstractMesh | None = None):
    return jax.sharding.use_abstract_mesh(mesh or h100_abstract_mesh())


@contextlib.contextmanager
def gpu_interpret(detect_races: bool = False):
    """Context in which Mosaic GPU kernels run in GPU interpret mode on the CPU."""
    gpu_callbacks.reset_gpu_interpret_mode_state()
    try:
        with _h100_mesh(), force_gpu_interpret_mode(InterpretGPUParams(detect_races=detect_races)):
            yield
    except BaseException:
        # Interpret state is global; a failure inside must not poison later runs.
        gpu_callbacks.reset_gpu_interpret_mode_state()
        raise


def races_detected() -> bool:
    """Whether the last :func:`gpu_interpret` run with ``detect_races`` saw a race."""
    return bool(gpu_callbacks.get_races().races_found)


def lower_for_cuda(fn, *args, mesh=None, **kwargs) -> jax.export.Exported:
    """Lowers ``jax.jit(fn)(*args)`` for CUDA (Mosaic GPU included) on any host.

    ``mesh``: an :func:`h100_abstract_mesh` for sharded functions (args then
    carry ``NamedSharding``s on it).
    """
    with _h100_mesh(mesh):
        return jax.export.export(
            jax.jit(fn, **kwargs),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")],
        )(*args)


# ----------------------------------------------------------------------------
# TMA reductions in GPU interpret mode
# ----------------------------------------------------------------------------

_REDUCTIONS = {"add": np.add, "min": np.minimum, "max": np.maximum}
_reduce_lock = threading.Lock()


class _AsyncReduceSmemToGmemTask(gpu_callbacks.AsyncCopySmemToGmemTask):
    """A SMEM -> GMEM TMA store that combines with the destination (``reduction_op``)."""

    def __init__(self, *args, combine, **kwargs):
        super().__init__(*args, **kwargs)
        self.combine = combine

    def post_read(self, tma_thread_id: int, shared_memory):
        """As the plain store's race check, except that reductions do not race with
        each other (each is one atomic update, and they commute); against plain
        reads and writes of the window, unordered, they race as any write does."""
        if not shared_memory.detect_races:
            return
        self.clock.inc(tma_thread_id)
        self.write_clock = self.clock.copy()
        _check_reduction(
            self.thread,
            self.clock.async_smem_clock.copy(),
            self.dst_allocation_key,
            self.dst_access.range,
            self.source_info,
        )

    def __call__(self, tma_thread_id: int):
        shared_memory = gpu_callbacks._get_shared_memory()
        self.pre_read(tma_thread_id, shared_memory)
        val, _, _ = shared_memory.get_buffer_content(
            self.src_allocation_key, self.src_access, self.thread, logging_info=self.logging_info
        )
        if val is None or val.shape != self.src_access.shape:
            raise IndexError(
                f"Out-of-bounds TMA reduction from {self.src_allocation_key}: "
                f"reading [{self.src_access}]"
            )
        self.post_read(tma_thread_id, shared_memory)
        dst_shape = tuple(shared_memory.buffer_shape_and_dtype(self.dst_allocation_key).shape)
        store = gpu_callbacks._clip_store_to_shape(self.dst_access, val, dst_shape)
        if store is not None:
            access, val = store
            with _reduce_lock:  # read-modify-write is one atomic update
                old, _, _ = shared_memory.get_buffer_content(
                    self.dst_allocation_key, access, self.thread, logging_info=self.logging_info
                )
                new = self.combine(old, val.astype(old.dtype)).astype(old.dtype)
                shared_memory.store_buffer_content(
                    self.dst_allocation_key,
                    access,
                    new,
                    self.thread,
                    logging_info=self.logging_info,
                )
        self.post_write(tma_thread_id, shared_memory)


class _ReductionFrame(str):
    """The source frame of a recorded TMA reduction (tells it from a plain write)."""


def _check_reduction(thread, clock, buffer_key, window, source_info) -> None:
    races = gpu_callbacks.get_races()
    frame = _ReductionFrame(
        "pallas_call" if source_info is None else source_info_util.summarize(source_info)
    )
    with races.lock:
        writes = list(races.writes[buffer_key])
        reads = list(races.reads[buffer_key])
        # Recorded as a write, so later plain reads and writes are checked against it.
        races.writes[buffer_key].append((thread, clock, window, frame))
    accesses = [("write", w) for w in writes if not isinstance(w[3], _ReductionFrame)]
    for kind, (other_thread, other_clock, other_window, other_frame) in accesses + [
        ("read", r) for r in reads
    ]:
        if other_clock.ordered(clock) or not _ranges_overlap(window, other_window):
            continue
        print(
            f"RACE DETECTED\n  TMA reduction into {buffer_key}[{window}] from {thread}, "
            f"{frame}\n  clock: {clock}\n  {kind} of {buffer_key}[{other_window}] from "
            f"{other_thread}, {other_frame}\n  clock: {other_clock}\n"
        )
        with races.lock:
            races.races_found = True
        return


@gpu_callbacks.fail_on_exception
def _reduce_smem_to_gmem(
    *,
    token,
    mesh_location,
    thread,
    src_allocation_key_as_array,
    src_transforms,
    dst_allocation_key_as_array,
    dst_transforms,
    predicate,
    source_info,
    commit_group,
    reduction_op,
):
    del commit_group  # As upstream's copy: groups are not modelled.
    if reduction_op not in _REDUCTIONS:
        raise NotImplementedError(
            f"pallax.testing: TMA reduction_op={reduction_op!r} is not simulated; "
            f"supported: {sorted(_REDUCTIONS)}"
        )
    if predicate is not None:
        raise NotImplementedError("pallax.testing: predicated TMA reductions are not simulated")
    key = gpu_callbacks.HostAllocationKey
    src_key = key.from_array(src_allocation_key_as_array)
    dst_key = key.from_array(dst_allocation_key_as_array)
    noop = gpu_callbacks._remove_noop_transforms
    shared_memory = gpu_callbacks._get_shared_memory()
    clock = shared_memory.incr_clock(thread) if shared_memory.detect_races else None
    task = _AsyncReduceSmemToGmemTask(
        mesh_location=mesh_location,
        thread=thread,
        src_allocation_key=src_key,
        src_access=shared_memory.access(src_key, jax.tree.map(int, noop(src_transforms))),
        dst_allocation_key=dst_key,
        dst_access=shared_memory.access(dst_key, jax.tree.map(int, noop(dst_transforms))),
        source_info=source_info,
        clock=clock,
        combine=_REDUCTIONS[reduction_op],
    )
    shared_memory.execute_async_task(task)
    return token


def _copy_smem_to_gmem_with_reductions(original, **kwargs):
    if kwargs.get("reduction_op") is None:
        return original(**kwargs)
    return _reduce_smem_to_gmem(**kwargs)


def _install_tma_reductions():
    original = gpu_callbacks.copy_smem_to_gmem
    if getattr(original, "_pallax_reductions", False):
        return
    patched = functools.wraps(original)(
        functools.partial(_copy_smem_to_gmem_with_reductions, original)
    )
    patched._pallax_reductions = True
    gpu_callbacks.copy_smem_to_gmem = patched


def tma_reductions_simulated() -> bool:
    """Whether GPU interpret mode runs ``copy_smem_to_gmem(..., reduction_op=...)``."""
    return getattr(gpu_callbacks.copy_smem_to_gmem, "_pallax_reductions", False)


_install_tma_reductions()
