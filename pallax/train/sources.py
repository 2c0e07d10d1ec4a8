"""Models from either source the CLI accepts: a pallax checkpoint or a Hugging Face directory.

A Hugging Face directory holds ``config.json`` and ``*.safetensors`` (dense or
compressed-tensors) and usually ``tokenizer.json``; anything else is read as a
pallax run / checkpoint directory. Both give ``(model, meta, tokenizer)``, with
``meta["config"]`` a :class:`TrainConfig` dict as in a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from pallax.train.checkpoint import load_model
from pallax.train.config import TrainConfig, to_dict
from pallax.train.data import HFTokenizer, load_tokenizer

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def is_hf_directory(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def checkpoint_dir(path) -> Path:
    """Accepts a run directory (holding ``checkpoints/``) or the checkpoints directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} not found")
    return path


def default_dtype() -> str:
    """Compute dtype for Hugging Face models: float32 on CPU (exact), bfloat16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _tokenizer_file(candidates) -> HFTokenizer | None:
    """The first ``tokenizer.json`` among the directories ``candidates``."""
    for directory in candidates:
        if (Path(directory) / "tokenizer.json").is_file():
            return HFTokenizer(Path(directory) / "tokenizer.json")
    return None


def load_source(path, step: int | None = None, *, dtype: str | None = None, transform=None):
    """``(model, meta, tokenizer)`` from a Hugging Face directory or a pallax checkpoint.

    ``tokenizer`` is None for a Hugging Face directory without ``tokenizer.json``.
    ``transform`` (Hugging Face sources only) compresses each linear as it is read
    (see :func:`pallax.models.from_hf`). ``dtype`` sets a Hugging Face model's compute
    dtype (default :func:`default_dtype`; pallax checkpoints keep their own).
    """
    from pallax.models import from_hf

    path = Path(path)
    if is_hf_directory(path):
        if step is not None:
            raise ValueError(f"--step does not apply to the Hugging Face directory {str(path)!r}")
        model = from_hf(path, dtype=dtype or default_dtype(), transform=transform)
        tokenizer = _tokenizer_file([path])
        config = TrainConfig(model=model.config, tokenizer=getattr(tokenizer, "path", None))
        meta = {
            "config": to_dict(config),
            "step": 0,
            "source": str(path),
            "stop_tokens": _eos_tokens(path),
        }
        return model, meta, tokenizer
    if transform is not None:
        raise ValueError("transform applies to Hugging Face directories only")
    directory = checkpoint_dir(path)
    model, meta = load_model(directory, step)
    # A converted Hugging Face model keeps its tokenizer.json beside the checkpoints.
    tokenizer = _tokenizer_file([path, directory]) or load_tokenizer(
        meta["config"].get("tokenizer")
    )
    return model, meta, tokenizer


def _eos_tokens(path: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (else ``config.json``), as a list."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(t) for t in (eos if isinstance(eos, list) else [eos])]
    return []
