"""Hugging Face checkpoints <-> :class:`Transformer`: Llama, Mistral, Qwen2.5, Qwen3, Gemma 2/3.

compressed-tensors checkpoints (``pack-quantized`` int4/int8, ``sparse-bitmask``;
see :mod:`pallax.models.compressed_tensors`) load straight into
``QuantizedWeight`` / ``SparseWeight``, and ``to_hf(...,
format="compressed-tensors")`` writes them.

``from_hf`` reads ``config.json`` and the safetensors file(s) (sharded
checkpoints via ``model.safetensors.index.json``) one tensor at a time and puts
each straight onto the mesh with its logical sharding, so the host never holds
the whole model. ``to_hf`` writes a directory ``transformers`` can load.

Families (``FAMILIES``): the Llama layout plus q/k/v biases (Qwen2.5), per-head
q/k RMSNorm (Qwen3), and Gemma 2/3 (``1 + w`` norms, sandwich norms, GeGLU,
scaled embeddings, ``query_pre_attn_scalar``, soft caps, local/global layers
from ``layer_types``, separate local RoPE base for Gemma 3). Gemma 3's
multimodal ``Gemma3ForConditionalGeneration`` loads its text model only (with a
warning); anything a family option cannot express is rejected by name.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pallax._checks import check_finite as check_finite_values
from pallax.models import compressed_tensors as ct
from pallax.models.transformer import (
    RopeScaling,
    Transformer,
    TransformerConfig,
    logical_shardings,
)

# Architecture -> family; each family's config.json defaults (as transformers 5's
# config classes) for keys a file may omit.
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
SUPPORTED = tuple(FAMILIES)
# Multimodal wrappers whose text model we load: architecture -> (text family, tensor
# prefixes of its language model: transformers 5 layout, then the 4.x hub layout).
TEXT_ONLY = {
    "Gemma3ForConditionalGeneration": (
        "Gemma3ForCausalLM",
        ("model.language_model.", "language_model.model."),
    ),
}
_QWEN_DEFAULTS = dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
_GEMMA_DEFAULTS = dict(  # shapes too: multimodal text_configs often omit them
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)
FAMILY_DEFAULTS = {
    "llama": {},
    "mistral": {},
    "qwen2": {**_QWEN_DEFAULTS, "rope_theta": 10000.0},
    "qwen3": {**_QWEN_DEFAULTS, "head_dim": 128, "rope_theta": 10000.0},
    "gemma2": {
        **_GEMMA_DEFAULTS,
        "vocab_size": 256000,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "rope_theta": 10000.0,
    },
    "gemma3": {**_GEMMA_DEFAULTS, "vocab_size": 262_208, "sliding_window_pattern": 6},
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}


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
    if missing and FAMILIES.get((hf.get("architectures") or [None])[0]) in ("llama", "mistral"):
        raise ValueError(f"config.json lacks required key(s) {missing}")
    architectures = hf.get("architectures") or [None]
    if architectures[0] in TEXT_ONLY:
        raise ValueError(
            f"{architectures[0]} is multimodal: pass its text_config (from_hf does this "
            "and loads the text model only)"
        )
    if architectures[0] not in SUPPORTED:
        raise ValueError(f"unsupported architecture {architectures[0]!r}; expected {SUPPORTED}")
    family = FAMILIES[architectures[0]]
    if family not in ("llama", "mistral"):
        return _family_config_from_hf(hf, family)
    _reject_unsupported_options(hf, family)
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


def _reject_unsupported_options(hf: dict, family: str) -> None:
    """Options no family flag expresses would load silently wrong: name them."""
    if hf.get("attention_bias") and family != "qwen2":  # Qwen2 biases q/k/v regardless
        raise ValueError(f"attention_bias=True (an o_proj bias) is not supported for {family}")
    if hf.get("mlp_bias"):
        raise ValueError(f"mlp_bias=True is not supported for {family}")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (an encoder) is not supported")
    key = "hidden_activation" if family.startswith("gemma") else "hidden_act"
    activation = hf.get(key, FAMILY_DEFAULTS[family].get(key, "silu"))
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"{key}={activation!r} is not supported for {family} (supported: {tuple(_ACTIVATIONS)})"
        )


def _layer_windows(hf: dict, family: str, get) -> tuple[int | None, ...]:
    """Per-layer windows from ``layer_types`` (or the family's default pattern)."""
    num_layers = get("num_hidden_layers")
    window = get("sliding_window")
    if family.startswith("qwen") and not get("use_sliding_window"):
        window = None  # transformers ignores sliding_window then
    types = hf.get("layer_types")
    if types is None:
        if family == "gemma2":
            sliding = [i % 2 == 0 for i in range(num_layers)]
        elif family == "gemma3":
            pattern = get("sliding_window_pattern")
            sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
        else:
            first = get("max_window_layers")
            sliding = [window is not None and i >= first for i in range(num_layers)]
        types = ["sliding_attention" if s else "full_attention" for s in sliding]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (sliding/full attention only)")
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _family_rope(hf: dict, family: str, get) -> tuple[float, RopeScaling | None, float | None]:
    """``(rope_theta, rope_scaling, local_rope_theta)``; Gemma 3 has a base per layer type."""
    params = hf.get("rope_parameters") or {}
    if family != "gemma3":
        rope = {**params, **(hf.get("rope_scaling") or {})}
        theta = hf.get("rope_theta", rope.get("rope_theta", get("rope_theta")))
        return float(theta), _rope_scaling_from_hf(rope), None
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.update(hf.get("rope_scaling") or {})  # 4.x files: scaling of global layers
    theta = float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))
    local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    if local.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_type {local['rope_type']!r} on Gemma 3's sliding layers is not supported "
            "(default only)"
        )
    return theta, _rope_scaling_from_hf(full), local_theta


def _family_config_from_hf(hf: dict, family: str) -> TransformerConfig:
    """Qwen2.5 / Qwen3 / Gemma 2 / Gemma 3 ``config.json`` -> TransformerConfig."""
    defaults = FAMILY_DEFAULTS[family]

    def get(key):
        return hf.get(key, defaults.get(key))

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in (*required, "intermediate_size") if get(key) is None]
    if missing:
        raise ValueError(f"{family} config.json lacks {missing}")

    _reject_unsupported_options(hf, family)
    windows = _layer_windows(hf, family, get)
    theta, scaling, local_theta = _family_rope(hf, family, get)
    gemma = family.startswith("gemma")
    uniform = len(set(windows)) == 1
    soft_caps = (
        (get("attn_logit_softcapping"), get("final_logit_softcapping")) if gemma else (None, None)
    )
    return TransformerConfig(
        vocab_size=get("vocab_size"),
        embed_dim=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        num_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
        head_dim=get("head_dim"),
        mlp_dim=get("intermediate_size"),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=get("rms_norm_eps") or 1e-6,
        sliding_window=windows[0] if uniform else None,
        layer_windows=None if uniform else windows,
        tie_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "gemma3"),
        norm_weight_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma,
        mlp_activation=_ACTIVATIONS[get("hidden_activation") if gemma else "silu"],
        scale_embeddings=gemma,
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")) if gemma else None,
        attention_logits_soft_cap=None if soft_caps[0] is None else float(soft_caps[0]),
        final_logits_soft_cap=None if soft_caps[1] is None else float(soft_caps[1]),
        local_rope_theta=local_theta if local_theta != theta or scaling else None,
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


def _family_of(config: TransformerConfig) -> str:
    if config.sandwich_norms:
        return "gemma3" if config.qk_norm else "gemma2"
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window is not None else "llama"


# Runtime choices, not model definition: they never go to (or come from) config.json.
_RUNTIME_FIELDS = ("dtype", "attention_implementation", "sequence_method", "remat")


def _definition(config: TransformerConfig) -> dict:
    """The fields that define the model, windows and RoPE written per layer."""
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in (*_RUNTIME_FIELDS, "sliding_window", "layer_windows", "head_dim")
    }
    fields["windows"] = tuple(config.window(i) for i in range(config.num_layers))
    fields["ropes"] = tuple(config.rope(i) for i in range(config.num_layers))
    fields["head_dim"] = config.dim_per_head
    for name in ("rope_theta", "rope_scaling", "local_rope_theta"):
        del fields[name]  # compared per layer through "ropes"
    return fields


def _int_if_integral(x: float) -> int | float:
    """transformers validates some fields as int (e.g. query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else x


def _shape_to_hf(config: TransformerConfig) -> dict:
    """The ``config.json`` fields every family writes the same way."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_per_head,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": 32768,
        "torch_dtype": "float32",
    }


def _family_config_to_hf(config: TransformerConfig, family: str) -> dict:
    windows = [config.window(i) for i in range(config.num_layers)]
    local = sorted({w for w in windows if w is not None})
    if len(local) > 1:
        raise ValueError(f"{family} has one sliding window for all local layers, got {local}")
    hf = {
        "architectures": [next(a for a, f in FAMILIES.items() if f == family)],
        "model_type": _MODEL_TYPES[family],
        **_shape_to_hf(config),
        "sliding_window": local[0] if local else None,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
    }
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope.update(_rope_scaling_to_hf(config.rope_scaling) or {})
    if family.startswith("qwen"):
        hf.update(use_sliding_window=bool(local), max_window_layers=0, hidden_act="silu")
        hf.update(rope_theta=config.rope_theta, rope_parameters=rope)
        return hf
    activation = {v: k for k, v in _ACTIVATIONS.items()}[config.mlp_activation]
    hf.update(
        hidden_activation=activation,
        query_pre_attn_scalar=_int_if_integral(config.query_pre_attn_scalar or config.dim_per_head),
        attn_logit_softcapping=config.attention_logits_soft_cap,
        final_logit_softcapping=config.final_logits_soft_cap,
    )
    if family == "gemma2":
        hf.update(rope_theta=config.rope_theta, rope_parameters=rope)
        return hf
    local_theta = config.local_rope_theta
    hf["rope_parameters"] = {
        "full_attention": rope,
        "sliding_attention": (
            rope if local_theta is None else {"rope_type": "default", "rope_theta": local_theta}
        ),
    }
    return hf


def config_to_hf(config: TransformerConfig) -> dict:
    """``config.json`` of the family the config's options select; raises if any field
    would not survive the trip (e.g. Gemma-only options on a Llama-shaped config)."""
    family = _family_of(config)
    if family in ("llama", "mistral"):
        hf = _llama_config_to_hf(config)
    else:
        hf = _family_config_to_hf(config, family)
    back = _definition(config_from_hf(hf))
    differing = sorted(k for k, v in _definition(config).items() if back[k] != v)
    if differing:
        raise ValueError(
            f"this config has no {hf['architectures'][0]} equivalent: "
            f"{', '.join(differing)} cannot be written to config.json"
        )
    return hf


def _llama_config_to_hf(config: TransformerConfig) -> dict:
    if config.layer_windows is not None and len(set(config.layer_windows)) > 1:
        raise ValueError("per-layer windows have no Llama/Mistral config equivalent")
    mistral = config.sliding_window is not None
    return {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        **_shape_to_hf(config),
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(config.rope_scaling),
        "sliding_window": config.sliding_window,
        "hidden_act": "silu",
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
        if config.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = (*block, "attention", proj, "bias")
                names[prefix + f"self_attn.{proj}.bias"] = (bias, False)
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[prefix + f"self_attn.{norm}.weight"] = (
                    (*block, "attention", norm, "scale"),
                    False,
                )
        if config.sandwich_norms:  # Gemma: HF post_attention_layernorm norms the attention
            # output; its pre_feedforward_layernorm is our (pre-MLP) post_attention_norm.
            names[prefix + "post_attention_layernorm.weight"] = (
                (*block, "attention_out_norm", "scale"),
                False,
            )
            names[prefix + "pre_feedforward_layernorm.weight"] = (
                (*block, "post_attention_norm", "scale"),
                False,
            )
            names[prefix + "post_feedforward_layernorm.weight"] = (
                (*block, "mlp_out_norm", "scale"),
                False,
            )
    return names


def _text_model_names(names: dict, files: dict, prefixes: tuple[str, ...]) -> dict:
    """Renames ``model.*`` to the language model's prefix used in a multimodal checkpoint."""
    for prefix in prefixes:
        renamed = {
            (prefix + n[len("model.") :] if n.startswith("model.") else n): v
            for n, v in names.items()
        }
        if all(n in files for n in renamed if n != "lm_head.weight"):
            return renamed
    return names  # reported as missing tensors below


def _check_unexpected_tensors(names: dict, files: dict, path) -> None:
    """Block tensors we would not read (biases, extra norms) mean a variant we do not model."""
    ours = {n.split("layers.", 1)[-1] for n in names}
    extra = sorted(
        n
        for n in files
        if ".layers." in n
        and n.split("layers.", 1)[-1] not in ours
        and "vision" not in n
        and not n.endswith("rotary_emb.inv_freq")
    )
    if extra:
        raise ValueError(f"checkpoint {path} has tensors this config does not use: {extra[:5]}")


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
    path,
    *,
    mesh=None,
    dtype: str = "bfloat16",
    check_finite: bool = False,
    transform=None,
    **config_overrides,
) -> Transformer:
    """Loads a Llama / Mistral checkpoint directory into a :class:`Transformer`.

    With ``mesh`` the parameters are created directly sharded by the logical
    rules (tensor by tensor: nothing is materialised whole on the host beyond
    one tensor). ``config_overrides`` replace TransformerConfig fields (e.g.
    ``attention_implementation``). ``check_finite`` rejects NaN/inf weights,
    naming the tensor (one pass over each block as it is read).
    compressed-tensors layers become ``QuantizedWeight`` / ``SparseWeight``.
    ``transform(linear_path, kernel)``, if given, is applied to each dense
    linear kernel ``[in, out]`` as soon as it is read (e.g. to quantize it), so
    a conversion never holds the dense model.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {str(path)!r} not found")
    hf_config = read_json(path / "config.json", "config file")
    architecture = (hf_config.get("architectures") or [None])[0]
    text_prefixes = None
    if architecture in TEXT_ONLY:
        text_architecture, text_prefixes = TEXT_ONLY[architecture]
        if not isinstance(hf_config.get("text_config"), dict):
            raise ValueError(f"{path / 'config.json'}: {architecture} config has no text_config")
        warnings.warn(
            f"{architecture}: loading the text model only ({text_architecture}); "
            "the vision tower and projector are ignored",
            stacklevel=2,
        )
        hf_config = {**hf_config["text_config"], "architectures": [text_architecture]}
    config = config_from_hf(hf_config)
    unknown = set(config_overrides) - set(config.__dict__)
    if unknown:
        raise ValueError(f"unknown TransformerConfig override(s) {sorted(unknown)}")
    config = TransformerConfig(**{**config.__dict__, "dtype": dtype, **config_overrides})
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shardings = logical_shardings(model, mesh) if mesh is not None else None
    files = _tensor_files(path)
    names = _hf_names(config)
    if text_prefixes is not None:
        names = _text_model_names(names, files, text_prefixes)
        if config.tie_embeddings:
            names.pop("lm_head.weight", None)
    compressed = _compressed_linears(hf_config, files, names)
    # A compressed linear's tensors (weight_packed, weight_scale, ...) are read above.
    compressed_modules = tuple(name.removesuffix("weight") for name in compressed)
    plain_files = {n: f for n, f in files.items() if not n.startswith(compressed_modules)}
    _check_unexpected_tensors(names, plain_files, path)
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
            with _open_safetensors(files[name]) as f:
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
