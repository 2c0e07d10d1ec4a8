"""Training configuration: one dataclass, presets, and JSON / TOML files.

A config file holds training fields at the top level and model fields under
``[model]`` (TOML) or ``"model"`` (JSON), on top of an optional ``preset``::

    preset = "tiny"
    steps = 2000
    learning_rate = 1e-3
    [model]
    sliding_window = 128
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from pallax._checks import check_float, check_int
from pallax.models import TransformerConfig
from pallax.sharding import CommQuant

# Model presets. "tiny" trains on a 2-core CPU in minutes; "1b" is a Llama-3.2-1B
# shaped body (16 x 2048, GQA 32:8, SwiGLU 8192) with the byte vocabulary.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=2, mlp_dim=688, sliding_window=64
    ),
    "small": dict(
        embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1408, sliding_window=256
    ),
    "1b": dict(
        embed_dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        rope_theta=500000.0,
        sliding_window=4096,
        remat=True,
    ),
}
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=256, batch_size=16, steps=300, learning_rate=3e-3, warmup_steps=30),
    "small": dict(seq_len=1024, batch_size=32, steps=2000, learning_rate=1e-3, warmup_steps=100),
    "1b": dict(seq_len=4096, batch_size=32, steps=10000, learning_rate=3e-4, warmup_steps=500),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the model config.

    ``batch_size`` is the global batch in sequences per optimizer step; with
    ``grad_accum > 1`` it is split into that many micro-batches. The learning
    rate warms up linearly for ``warmup_steps`` then decays (cosine) to
    ``learning_rate * min_lr_ratio`` at ``steps``.
    """

    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    grad_accum: int = 1
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    data: str | None = None  # None = embedded corpus; a .txt file/dir or a .npy of token ids
    tokenizer: str | None = None  # None = bytes; or a Hugging Face tokenizers JSON file
    validation_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    mesh: str | None = None  # e.g. "data=2,tensor=2"; None = every device on data
    peak_tflops: float | None = None  # per device, for MFU; None = known GPUs only
    # Quantized fsdp communication (pallax.sharding.comm_quant; needs an fsdp axis > 1):
    # "none" | "int8" | "int4" for the weight all-gathers and the gradient reduction.
    comm_quant_weights: str = "none"
    comm_quant_grads: str = "none"
    comm_quant_block: int = 128  # values per float32 scale
    comm_hpz: bool = False  # backward weight gather within the host (host-local copy)
    comm_hadamard: bool = False  # Hadamard-rotate gradient blocks before quantizing
    comm_weight_diff: bool = False  # SDP4Bit: gather weight changes into a replicated copy
    comm_fsdp_per_host: int | None = None  # None = from the process layout
    comm_explicit: bool = False  # explicit fp32 collectives even when nothing is quantized

    def __post_init__(self):
        self._validate_types()
        positive = ("seq_len", "batch_size", "steps", "grad_accum", "log_every", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )
        if self.clip_norm < 0 or self.weight_decay < 0:
            raise ValueError(
                f"clip_norm={self.clip_norm} and weight_decay={self.weight_decay} must be >= 0"
            )
        try:
            self.comm_quant()
        except ValueError as e:
            raise ValueError(f"comm_* settings (quantized fsdp communication): {e}") from e

    def _validate_types(self):
        """Every field's type (and the mesh spec's syntax), naming the field."""
        if not isinstance(self.model, TransformerConfig):
            raise ValueError(f"model must be a TransformerConfig, got {type(self.model).__name__}")
        ints = (
            "seq_len", "batch_size", "steps", "grad_accum", "warmup_steps", "seed", "eval_every",
            "eval_batches", "log_every", "checkpoint_every", "keep_checkpoints",
        )  # fmt: skip
        for name in ints:
            check_int(name, getattr(self, name))
        floats = (
            "learning_rate", "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "clip_norm",
            "validation_fraction",
        )  # fmt: skip
        for name in floats:
            check_float(name, getattr(self, name))
        for name in ("adam_b1", "adam_b2"):
            check_float(name, getattr(self, name), minimum=0.0, maximum=1.0, open_max=True)
        if self.peak_tflops is not None:
            check_float("peak_tflops", self.peak_tflops, minimum=0.0, open_min=True)
        for name in ("data", "tokenizer", "mesh"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        if self.mesh is not None:
            from pallax.sharding import parse_mesh_spec

            parse_mesh_spec(self.mesh)

    def comm_quant(self) -> CommQuant:
        """The :class:`pallax.sharding.CommQuant` described by the ``comm_*`` fields."""
        return CommQuant(
            weights=self.comm_quant_weights,
            grads=self.comm_quant_grads,
            block_size=self.comm_quant_block,
            hpz=self.comm_hpz,
            hadamard=self.comm_hadamard,
            weight_diff=self.comm_weight_diff,
            fsdp_per_host=self.comm_fsdp_per_host,
            explicit=self.comm_explicit,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> TrainConfig:
        """A copy with training fields and, under ``model=dict(...)``, model fields changed."""
        return from_dict({**to_dict(self), **changes, "model": changes.get("model", {})}, self)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _model_config(values: dict[str, Any]) -> TransformerConfig:
    unknown = set(values) - _fields(TransformerConfig)
    if unknown:
        raise ValueError(
            f"unknown model setting(s) {sorted(unknown)}; "
            f"valid: {sorted(_fields(TransformerConfig))}"
        )
    values = dict(values)
    if values.get("layer_windows") is not None:
        values["layer_windows"] = tuple(values["layer_windows"])
    return TransformerConfig(**values)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    model = values["model"]
    if model.get("layer_windows") is not None:
        model["layer_windows"] = list(model["layer_windows"])
    return values


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Builds a TrainConfig from ``values`` on top of ``base`` (or of ``values["preset"]``)."""
    if not isinstance(values, dict):
        raise ValueError(f"settings must be a dict, got {type(values).__name__}")
    values = dict(values)
    preset = values.pop("preset", None)
    if base is None:
        base = preset_config(preset) if preset is not None else TrainConfig()
    elif preset is not None:
        raise ValueError("'preset' cannot be combined with a base config")
    unknown = set(values) - _fields(TrainConfig)
    if unknown:
        raise ValueError(
            f"unknown training setting(s) {sorted(unknown)}; valid: {sorted(_fields(TrainConfig))}"
        )
    model_values = values.pop("model", None) or {}
    if not isinstance(model_values, dict):
        raise ValueError(f"'model' must be a table of model settings, got {model_values!r}")
    model = {**dataclasses.asdict(base.model), **model_values}
    train = {**{k: v for k, v in to_dict(base).items() if k != "model"}, **values}
    return TrainConfig(model=_model_config(model), **train)


def preset_config(name: str) -> TrainConfig:
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return TrainConfig(model=TransformerConfig(**MODEL_PRESETS[name]), **TRAIN_PRESETS[name])


def load_config(path: str | Path) -> TrainConfig:
    """Reads a ``.toml`` or ``.json`` config file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({e.reason})") from None
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file {str(path)!r} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse {str(path)!r}: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{str(path)!r} must hold a table/object of settings")
    try:
        return from_dict(values)
    except (TypeError, ValueError) as e:  # name the file as well as the setting
        raise ValueError(f"bad setting in {str(path)!r}: {e}") from None
