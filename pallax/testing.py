"""Run and lower Mosaic GPU kernels on a machine without a GPU.

* :func:`gpu_interpret` runs kernels in Pallas' GPU interpret mode (simulated
  SMEM, TMA, barriers and wgmma on the CPU, optionally detecting races).
* :func:`lower_for_cuda` runs the full Mosaic GPU lowering for CUDA through
  ``jax.export``, so unsupported ops, bad tile shapes and shared-memory
  overflow are caught on CPU.

Both pretend to be an H100 through an abstract mesh; kernels must not query the
real device at trace time.
"""

from __future__ import annotations

import contextlib

import jax
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
