"""Hugging Face Llama / Mistral checkpoints <-> :class:`Transformer`.

``from_hf`` reads ``config.json`` and the safetensors file(s) (sharded
checkpoints via ``model.safetensors.index.json``) one tensor at a time and puts
each straight onto the mesh with its logical sharding, so the host never holds
the whole model. ``to_hf`` writes a directory ``transformers`` can load.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pallax._checks import check_finite as check_finite_values
from pallax.models.transformer import (
    RopeScaling,
    Transformer,
    TransformerConfig,
    logical_shardings,
)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a missing, non-UTF-8 or garbled file is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object")
    return values


def config_from_hf(hf: dict) -> TransformerConfig:
    """TransformerConfig from a Hugging Face ``config.json`` dict; missing keys are named."""
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in (*required, "intermediate_size") if key not in hf]
    if missing and (hf.get("architectures") or [None])[0] in SUPPORTED:
        raise ValueError(f"config.json lacks required key(s) {missing}")
    architectures = hf.get("architectures") or [None]
    if architectures[0] not in SUPPORTED:
        raise ValueError(f"unsupported architecture {architectures[0]!r}; expected {SUPPORTED}")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    # transformers >= 5 nests RoPE settings in rope_parameters; older files
    # have rope_theta at the top and rope_scaling (with "type" or "rope_type").
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        mlp_dim=hf["intermediate_size"],
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_hf(rope),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _rope_scaling_from_hf(rope: dict) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_positions=int(rope["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def _rope_scaling_to_hf(scaling: RopeScaling | None) -> dict | None:
    if scaling is None:
        return None
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_positions,
    }


def config_to_hf(config: TransformerConfig) -> dict:
    if config.layer_windows is not None and len(set(config.layer_windows)) > 1:
        raise ValueError("per-layer windows have no Llama/Mistral config equivalent")
    mistral = config.sliding_window is not None
    return {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_per_head,
        "intermediate_size": config.mlp_dim,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(config.rope_scaling),
        "rms_norm_eps": config.norm_eps,
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "torch_dtype": "float32",
    }


def _hf_names(config: TransformerConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (our parameter path, transpose?)."""
    names = {
        "model.embed_tokens.weight": (("embed",), False),
        "model.norm.weight": (("final_norm", "scale"), False),
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        block = ("blocks", i)
        names[prefix + "input_layernorm.weight"] = ((*block, "input_norm", "scale"), False)
        names[prefix + "post_attention_layernorm.weight"] = (
            (*block, "post_attention_norm", "scale"),
            False,
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[prefix + f"self_attn.{proj}.weight"] = (
                (*block, "attention", proj, "kernel"),
                True,
            )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[prefix + f"mlp.{proj}.weight"] = ((*block, "mlp", proj, "kernel"), True)
    return names


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"safetensors index {str(index)!r} has no 'weight_map' object")
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            with _open_safetensors(file):  # damaged or missing files named up front
                pass
        return files
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors or index in {path}")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _open_safetensors(file: Path):
    """``safe_open`` whose failures (missing, truncated, garbled header) name the file."""
    if not file.is_file():
        raise FileNotFoundError(f"safetensors file {str(file)!r} not found")
    try:
        return safe_open(file, "np")
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends carry no file name
        raise ValueError(f"cannot read safetensors file {str(file)!r}: {e}") from None


def from_hf(
    path, *, mesh=None, dtype: str = "bfloat16", check_finite: bool = False, **config_overrides
) -> Transformer:
    """Loads a Llama / Mistral checkpoint directory into a :class:`Transformer`.

    With ``mesh`` the parameters are created directly sharded by the logical
    rules (tensor by tensor: nothing is materialised whole on the host beyond
    one tensor). ``config_overrides`` replace TransformerConfig fields (e.g.
    ``attention_implementation``). ``check_finite`` rejects NaN/inf weights,
    naming the tensor (one pass over each block as it is read).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {str(path)!r} not found")
    config = config_from_hf(read_json(path / "config.json", "config file"))
    unknown = set(config_overrides) - set(config.__dict__)
    if unknown:
        raise ValueError(f"unknown TransformerConfig override(s) {sorted(unknown)}")
    config = TransformerConfig(**{**config.__dict__, "dtype": dtype, **config_overrides})
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shardings = logical_shardings(model, mesh) if mesh is not None else None
    files = _tensor_files(path)
    names = _hf_names(config)
    missing = sorted(set(names) - set(files))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors {missing[:5]}")
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for name, (param_path, transpose) in names.items():
        variable = flat[param_path]
        expected = variable.get_value().shape
        with _open_safetensors(files[name]) as f:
            try:
                tensor = f.get_slice(name)
            except Exception as e:  # noqa: BLE001 - listed by the index but absent
                raise ValueError(f"{str(files[name])!r}: cannot read tensor {name}: {e}") from None
            stored = tuple(tensor.get_shape())
            if (stored[::-1] if transpose else stored) != expected:
                raise ValueError(f"{name}: shape {stored} does not match the config ({expected})")

            def read(index, tensor=tensor, transpose=transpose, shape=expected, name=name):
                """Only the block a device holds is read from disk."""
                index = tuple(index) + (slice(None),) * (len(shape) - len(index))
                try:
                    block = tensor[index[::-1]].T if transpose else tensor[index]
                except Exception as e:  # noqa: BLE001 - e.g. a truncated data section
                    raise ValueError(f"{str(files[name])!r}: cannot read {name}: {e}") from None
                block = np.asarray(block, np.float32)
                if check_finite:
                    check_finite_values(f"{name} in {str(files[name])!r} (block {index})", block)
                return block

            if param_path in flat_shardings:
                value = jax.make_array_from_callback(expected, flat_shardings[param_path], read)
            else:
                value = jnp.asarray(read((slice(None),) * len(expected)))
        variable.set_value(value)
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def to_hf(model: Transformer, path, *, max_shard_bytes: int | None = None) -> Path:
    """Writes ``config.json`` + safetensors (sharded when over ``max_shard_bytes``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    tensors = {}
    for name, (param_path, transpose) in _hf_names(config).items():
        value = flat[param_path].get_value()
        if not isinstance(value, jax.Array):
            raise ValueError(f"{name} is {type(value).__name__}: convert to dense before to_hf")
        array = np.asarray(jax.device_get(value), np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    if max_shard_bytes is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    )
    return path
