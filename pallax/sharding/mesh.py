"""Device meshes with named parallelism axes, and multi-host start-up.

Axes, outermost to innermost: ``data`` (replicas), ``fsdp`` (ZeRO-3 parameter
and optimizer-state sharding, also splits the batch), ``sequence`` (sequence /
context parallelism), ``tensor`` (Megatron tensor parallelism, innermost so it
maps to the fastest links).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from pallax._checks import check_int, check_optional_int

DATA, FSDP, SEQUENCE, TENSOR = "data", "fsdp", "sequence", "tensor"
AXES = (DATA, FSDP, SEQUENCE, TENSOR)
BATCH_AXES = (DATA, FSDP)  # The batch is split over both.


def _resolve_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    for name, size in sizes.items():
        check_int(f"mesh axis {name}", size)
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size}: sizes must be positive or -1")
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {inferred}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if num_devices % known:
            raise ValueError(
                f"cannot infer {inferred[0]}: {num_devices} devices are not divisible by "
                f"the other axes' product {known} ({sizes})"
            )
        sizes = dict(sizes, **{inferred[0]: num_devices // known})
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh axes {sizes} multiply to {math.prod(sizes.values())}, "
            f"but there are {num_devices} devices"
        )
    return sizes


def _device_grid(shape: tuple[int, ...], devices: Sequence) -> np.ndarray:
    """Devices laid out so that inner axes stay within a process when possible."""
    num_processes = len({d.process_index for d in devices})
    if num_processes > 1:
        # Hybrid layout: put the process boundary on the outermost axes that
        # can absorb it (data first, then fsdp), keeping sequence/tensor local.
        remaining, dcn = num_processes, []
        for size in shape:
            step = math.gcd(size, remaining)
            dcn.append(step)
            remaining //= step
        if remaining == 1:
            ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
            return mesh_utils.create_hybrid_device_mesh(
                ici, tuple(dcn), devices, process_is_granule=True
            )
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices).reshape(shape)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    sequence: int = 1,
    *,
    devices: Sequence | None = None,
    axis_types: str = "auto",
) -> jax.sharding.Mesh:
    """Builds a ``(data, fsdp, sequence, tensor)`` mesh; one size may be -1.

    ``axis_types``: ``"auto"`` (the compiler propagates shardings; the default
    for model code) or ``"explicit"`` (jax's sharding-in-types). Use the mesh
    with ``jax.set_mesh(mesh)``.
    """
    if devices is not None and (
        isinstance(devices, (str, bytes)) or not hasattr(devices, "__len__")
    ):
        raise ValueError(f"devices must be a sequence of jax devices, got {devices!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty: a mesh needs at least one device")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"devices must be jax devices, got {bad[0]!r}")
    if len(set(devices)) != len(devices):
        raise ValueError("devices lists a device more than once")
    sizes = _resolve_sizes(
        {DATA: data, FSDP: fsdp, SEQUENCE: sequence, TENSOR: tensor}, len(devices)
    )
    if axis_types not in ("auto", "explicit"):
        raise ValueError(f"axis_types must be 'auto' or 'explicit', got {axis_types!r}")
    kind = jax.sharding.AxisType.Auto if axis_types == "auto" else jax.sharding.AxisType.Explicit
    shape = tuple(sizes[a] for a in AXES)
    return jax.sharding.Mesh(_device_grid(shape, devices), AXES, axis_types=(kind,) * len(AXES))


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,tensor=4"`` -> ``{"data": 2, "tensor": 4}`` (for CLIs)."""
    if not isinstance(spec, str):
        raise ValueError(f"mesh spec must be a string like 'data=2,tensor=2', got {spec!r}")
    sizes = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"bad mesh entry {item!r}: expected one of {AXES} as name=int")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        sizes[name] = int(value)
    return sizes


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(
            f"environment variable {name}={os.environ[name]!r} is not an int"
        ) from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """``jax.distributed.initialize`` from arguments or the environment.

    Environment fallbacks: ``PALLAX_COORDINATOR``, ``PALLAX_NUM_PROCESSES``,
    ``PALLAX_PROCESS_ID``. With one process (or nothing configured) this is a
    no-op. On CPU, collectives go through gloo. Returns whether it initialised.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("PALLAX_COORDINATOR")
    if num_processes is None and "PALLAX_NUM_PROCESSES" in env:
        num_processes = _env_int("PALLAX_NUM_PROCESSES")
    if process_id is None and "PALLAX_PROCESS_ID" in env:
        process_id = _env_int("PALLAX_PROCESS_ID")
    check_optional_int("num_processes", num_processes)
    check_optional_int("process_id", process_id)
    if num_processes is None or num_processes <= 1:
        return False
    if coordinator_address is None or process_id is None:
        raise ValueError(
            f"multi-process run ({num_processes} processes) needs coordinator_address and "
            f"process_id (got {coordinator_address!r}, {process_id!r})"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True
