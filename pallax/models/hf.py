"""Hugging Face Llama / Mistral checkpoints <-> :class:`Transformer`.

compressed-tensors checkpoints (``pack-quantized`` int4/int8, ``sparse-bitmask``;
see :mod:`pallax.models.compressed_tensors`) load straight into
``QuantizedWeight`` / ``SparseWeight``, and ``to_hf(...,
format="compressed-tensors")`` writes them.

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

from pallax.models import compressed_tensors as ct
from pallax.models.transformer import (
    RopeScaling,
    Transformer,
    TransformerConfig,
    logical_shardings,
)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def config_from_hf(hf: dict) -> TransformerConfig:
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
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors or index in {path}")
    with safe_open(single, "np") as f:
        return {name: single for name in f.keys()}


def from_hf(
    path, *, mesh=None, dtype: str = "bfloat16", transform=None, **config_overrides
) -> Transformer:
    """Loads a Llama / Mistral checkpoint directory into a :class:`Transformer`.

    With ``mesh`` the parameters are created directly sharded by the logical
    rules (tensor by tensor: nothing is materialised whole on the host beyond
    one tensor). ``config_overrides`` replace TransformerConfig fields (e.g.
    ``attention_implementation``). compressed-tensors layers become
    ``QuantizedWeight`` / ``SparseWeight``. ``transform(linear_path, kernel)``,
    if given, is applied to each dense linear kernel ``[in, out]`` as soon as it
    is read (e.g. to quantize it), so a conversion never holds the dense model.
    """
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf_config)
    config = TransformerConfig(**{**config.__dict__, "dtype": dtype, **config_overrides})
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shardings = logical_shardings(model, mesh) if mesh is not None else None
    files = _tensor_files(path)
    names = _hf_names(config)
    compressed = _compressed_linears(hf_config, files, names)
    names = {name: entry for name, entry in names.items() if name not in compressed}
    missing = sorted(set(names) - set(files))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors {missing[:5]}")
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for name, (param_path, transpose) in names.items():
        variable = flat[param_path]
        expected = variable.get_value().shape
        with safe_open(files[name], "np") as f:
            tensor = f.get_slice(name)
            stored = tuple(tensor.get_shape())
            if (stored[::-1] if transpose else stored) != expected:
                raise ValueError(f"{name}: shape {stored} does not match the config ({expected})")

            def read(index, tensor=tensor, transpose=transpose, shape=expected):
                """Only the block a device holds is read from disk."""
                index = tuple(index) + (slice(None),) * (len(shape) - len(index))
                block = tensor[index[::-1]].T if transpose else tensor[index]
                return np.asarray(block, np.float32)

            if param_path in flat_shardings:
                value = jax.make_array_from_callback(expected, flat_shardings[param_path], read)
            else:
                value = jnp.asarray(read((slice(None),) * len(expected)))
        if transform is not None and transpose and param_path[-1] == "kernel":
            value = transform(".".join(str(p) for p in param_path[:-1]), value)
        variable.set_value(value)
    for name, (param_path, weight, _) in compressed.items():
        expected = flat[param_path].get_value().shape
        if weight.shape != expected:
            raise ValueError(
                f"{name}: compressed weight of shape [in, out] = {list(weight.shape)} does "
                f"not match the config ({list(expected)})"
            )
        flat[param_path].set_value(weight)
    nnx.update(model, nnx.from_flat_state(flat))
    if compressed:
        _set_act_bits(model, {p: bits for p, _, bits in compressed.values()})
    if mesh is not None and (compressed or transform is not None):
        from pallax.models.transformer import shard_model

        shard_model(model, mesh)
    return model


def _compressed_linears(hf_config: dict, files: dict, names: dict) -> dict:
    """``{hf name: (param path, QuantizedWeight | SparseWeight, act_bits)}`` of the
    linears a compressed-tensors checkpoint stores compressed (none otherwise)."""
    quantization = hf_config.get("quantization_config")
    if not quantization:
        return {}
    method = quantization.get("quant_method")
    if method != ct.QUANT_METHOD:
        raise ValueError(
            f"quantization_config quant_method {method!r} is not supported "
            f"(supported: {ct.QUANT_METHOD!r})"
        )

    def read(tensor_names):
        out = {}
        for name in tensor_names:
            if name not in files:
                raise ValueError(f"compressed-tensors checkpoint lacks tensor {name!r}")
            with safe_open(files[name], "np") as f:
                out[name] = f.get_tensor(name)
        return out

    compressed = {}
    for name, (param_path, transpose) in names.items():
        if not transpose:  # embeddings and norms stay dense
            continue
        module = name.removesuffix(".weight")
        weight = ct.read_linear(module, quantization, files.__contains__, read)
        if weight is not None:
            compressed[name] = (param_path, weight, ct.act_bits_for(quantization, module))
    return compressed


def _set_act_bits(model: Transformer, act_bits: dict[tuple, int | None]) -> None:
    from pallax.models.convert import linears

    by_path = dict(linears(model))
    for param_path, bits in act_bits.items():
        by_path[".".join(str(p) for p in param_path[:-1])].act_bits = bits


def to_hf(
    model: Transformer, path, *, max_shard_bytes: int | None = None, format: str = "dense"
) -> Path:
    """Writes ``config.json`` + safetensors (sharded when over ``max_shard_bytes``).

    ``format="compressed-tensors"`` writes quantized / sparse linears as
    compressed-tensors ``pack-quantized`` / ``sparse-bitmask`` tensors with their
    ``quantization_config`` (what vLLM and transformers load); ``"dense"``
    accepts dense models only.
    """
    if format not in ("dense", "compressed-tensors"):
        raise ValueError(f"format must be 'dense' or 'compressed-tensors', got {format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = config_to_hf(config)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    tensors = {}
    compressed = {}  # hf module name -> (weight, act_bits)
    for name, (param_path, transpose) in _hf_names(config).items():
        value = flat[param_path].get_value()
        if not isinstance(value, jax.Array):
            if format != "compressed-tensors":
                raise ValueError(
                    f"{name} is {type(value).__name__}: pass format='compressed-tensors' "
                    "or convert to dense before to_hf"
                )
            module = name.removesuffix(".weight")
            if isinstance(value, ct.SparseShards):
                value = value.merge()
            compressed[module] = (value, _act_bits(model, param_path))
            if isinstance(value, ct.QuantizedWeight):
                for key, array in ct.quantized_to_ct(value).items():
                    tensors[f"{module}.{key}"] = np.ascontiguousarray(array)
            else:
                for key, array in ct.sparse_to_ct(value).items():
                    tensors[f"{name}.{key}"] = np.ascontiguousarray(array)
            continue
        array = np.asarray(jax.device_get(value), np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    if compressed:
        hf_config["quantization_config"] = ct.quantization_config(compressed)
        (path / "config.json").write_text(json.dumps(hf_config, indent=2))
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


def _act_bits(model: Transformer, param_path: tuple) -> int | None:
    from pallax.models.convert import linears

    return dict(linears(model))[".".join(str(p) for p in param_path[:-1])].act_bits
