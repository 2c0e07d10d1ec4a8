"""The one rule every public op uses to pick its implementation."""

from __future__ import annotations

from typing import Literal

import jax

Implementation = Literal["mosaic", "xla"] | None


def on_hopper() -> bool:
    """True when the default backend is an sm_90 GPU (H100/H200)."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def choose_implementation(
    implementation: Implementation, unsupported: str | None, *, mosaic_pays: bool = True
) -> str:
    """Validates ``implementation`` and resolves ``None``.

    ``unsupported``: why the Mosaic kernel cannot take these inputs (None if it
    can); an explicit ``"mosaic"`` then raises. ``None`` picks Mosaic on Hopper
    when it is supported and ``mosaic_pays`` (e.g. the problem is memory bound).
    """
    if implementation not in (None, "mosaic", "xla"):
        raise ValueError(f"implementation must be None, 'mosaic' or 'xla', got {implementation!r}")
    if implementation == "mosaic" and unsupported:
        raise ValueError(f"implementation='mosaic' does not support {unsupported}")
    if implementation is None:
        use_mosaic = mosaic_pays and not unsupported and on_hopper()
        return "mosaic" if use_mosaic else "xla"
    return implementation


def cotangent_like(grad, primal):
    """Types ``grad`` like ``primal`` for shard_map's varying-axes (vma) check.

    A custom_vjp inside ``shard_map`` must return cotangents with its inputs'
    vma: axes on which only ``grad`` varies are summed (the primal was shared
    across them), axes on which only ``primal`` varies are cast to varying
    (e.g. Pallas outputs, which carry no vma).
    """
    grad_axes, primal_axes = jax.typeof(grad).mat.varying, jax.typeof(primal).mat.varying
    extra = tuple(grad_axes - primal_axes)
    if extra:
        grad = jax.lax.psum(grad, extra)
    missing = tuple(primal_axes - grad_axes)
    return jax.lax.pcast(grad, missing, to="varying") if missing else grad
