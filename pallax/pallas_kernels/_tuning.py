"""Tuned kernel configs per device kind, read by the ops when no config is given.

``pallax/pallas_kernels/tuned/<device kind>.json`` (written by
``benchmarks/gpu_proof.py``'s variant sweep on that device) holds entries

    {"kernel": "quantized_matmul",
     "key": {"mode": "w4a16", "in": 4096, "out": 14336, "tokens": 16},
     "config": {"block_n": 64, "max_concurrent_steps": 6},
     "seconds": 1.1e-05, "default_seconds": 1.4e-05}

An op whose ``config`` is None looks up its problem key (built by the
``*_key`` functions below, so the sweep and the ops agree on it) for the
device it runs on; no file or no matching entry means the kernel's defaults.
Keys are exact apart from the token count, which is rounded up to a power of
two. ``$PALLAX_TUNED_DIR`` points the lookup at another directory (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

import jax

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
TUNED_DIR_ENV = "PALLAX_TUNED_DIR"
KERNELS = ("quantized_matmul", "sparse_matmul", "attention", "decode_attention")


def device_file_name(device_kind: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3.json"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_") + ".json"


def tuned_dir() -> Path:
    return Path(os.environ.get(TUNED_DIR_ENV) or TUNED_DIR)


def token_bucket(tokens: int) -> int:
    """Smallest power of two >= ``tokens`` (tokens >= 1)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


# Problem keys: what a tuned entry is matched on.


def quantized_key(tokens: int, in_features: int, out_features: int, bits: int, act_bits) -> dict:
    mode = "w8a8" if act_bits == 8 else f"w{bits}a16"
    return {"mode": mode, "in": in_features, "out": out_features, "tokens": token_bucket(tokens)}


def sparse_key(tokens: int, in_features: int, out_features: int, density: float) -> dict:
    return {
        "in": in_features,
        "out": out_features,
        "tokens": token_bucket(tokens),
        "density": round(float(density), 1),
    }


def attention_key(head_dim: int, q_len: int, kv_len: int, left: int, right: int) -> dict:
    span = min(left + right + 1, kv_len)  # keys one query can see
    return {"head_dim": head_dim, "q_len": token_bucket(q_len), "kv_len": kv_len, "span": span}


def decode_key(head_dim: int, group: int, num_new: int, cache_len: int) -> dict:
    return {"head_dim": head_dim, "group": group, "num_new": num_new, "cache_len": cache_len}


# Loading.


def _bad(path, message):
    return ValueError(f"tuned-config file {path}: {message}")


@functools.cache
def load(path: str) -> list[dict]:
    """Validated entries of one tuned file ([] if it does not exist)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise _bad(path, f"cannot be read as JSON ({e})") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise _bad(path, "needs a top-level object with an 'entries' list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"kernel", "key", "config"} <= set(entry):
            raise _bad(path, f"entry {i} needs 'kernel', 'key' and 'config', got {entry!r}")
        if entry["kernel"] not in KERNELS:
            raise _bad(path, f"entry {i}: unknown kernel {entry['kernel']!r} (not in {KERNELS})")
        if not isinstance(entry["key"], dict) or not isinstance(entry["config"], dict):
            raise _bad(path, f"entry {i}: 'key' and 'config' must be objects")
    return entries


def current_device_kind() -> str | None:
    """Device kind of the default backend when it is a GPU, else None."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return None
    return device.device_kind if device.platform == "gpu" else None


def lookup(kernel: str, config_cls, key: dict, device_kind: str | None = None):
    """The tuned ``config_cls`` for ``kernel`` at ``key`` on ``device_kind``
    (default: the device present), or None."""
    device_kind = device_kind or current_device_kind()
    if device_kind is None:
        return None
    path = str(tuned_dir() / device_file_name(device_kind))
    for i, entry in enumerate(load(path)):
        if entry["kernel"] == kernel and entry["key"] == key:
            fields = {f.name for f in dataclasses.fields(config_cls)}
            unknown = set(entry["config"]) - fields
            if unknown:
                raise _bad(
                    path,
                    f"entry {i} ({kernel} {key}) sets {sorted(unknown)}, which "
                    f"{config_cls.__name__} does not have (fields: {sorted(fields)})",
                )
            try:
                return config_cls(**entry["config"])
            except (TypeError, ValueError) as e:
                raise _bad(path, f"entry {i} ({kernel} {key}): {e}") from None
    return None


def resolve(config, kernel: str, config_cls, key: dict):
    """``config`` if given, else the tuned one for this device, else None (defaults)."""
    return config if config is not None else lookup(kernel, config_cls, key)
