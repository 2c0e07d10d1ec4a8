"""compressed-tensors side of the interoperability tests (Python 3.11 HF venv).

python ct_reference.py make DIR TOKENS.npy OUT.npz   # compress a tiny random Llama with
    # compressed-tensors (attention int4 asymmetric g32, down_proj int8 symmetric per
    # channel, gate/up sparse-bitmask 50%); OUT holds the dequantized weights and logits
python ct_reference.py check TOKENS.npy DIR...  # decompress directories we wrote with
    # compressed-tensors into DIR/reference.npz; without sparse layers, transformers
    # loads the directory too (logits)

compressed-tensors >= 0.15 keeps sparse-bitmask as a (legacy) config format and
its bitmask helpers but no longer ships the compressor; the 0.14 decompressor is
``dense[unpack_bitmasks(bitmask, shape)] = compressed``, done here with those helpers.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.config import BitmaskConfig
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import logits, tiny_config  # noqa: E402

ATTENTION = QuantizationScheme(
    targets=["re:.*self_attn\\.(q|k|v|o)_proj$"],
    weights=QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
)
DOWN = QuantizationScheme(
    targets=["re:.*mlp\\.down_proj$"],
    weights=QuantizationArgs(num_bits=8, symmetric=True, strategy="channel"),
)
SPARSE = ["re:.*mlp\\.(gate|up)_proj$"]


def _qparams(weight, args):
    if args.strategy == "group":
        groups = weight.reshape(weight.shape[0], -1, args.group_size)
        return calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    return calculate_qparams(weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), args)


def make(path, tokens_path, out_path):
    torch.manual_seed(0)
    config = tiny_config("llama")
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    dequantized = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        weight = module.weight.data
        scheme = ATTENTION if "self_attn" in name else DOWN if "down_proj" in name else None
        del tensors[f"{name}.weight"]
        if scheme is None:  # sparse-bitmask: 50% magnitude per row
            keep = weight.abs() >= weight.abs().median(dim=-1, keepdim=True).values
            dense = torch.where(keep, weight, torch.zeros_like(weight))
            mask = dense != 0
            counts = mask.sum(-1)
            tensors[f"{name}.weight.shape"] = torch.tensor(dense.shape)
            tensors[f"{name}.weight.compressed"] = dense[mask]
            tensors[f"{name}.weight.bitmask"] = pack_bitmasks(mask)
            tensors[f"{name}.weight.row_offsets"] = torch.cumsum(counts, 0) - counts
        else:
            scale, zero_point = _qparams(weight, scheme.weights)
            state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
            compressed = PackedQuantizationCompressor.compress(state, scheme)
            for key, value in compressed.items():
                tensors[f"{name}.{key}"] = value.contiguous()
            dense = PackedQuantizationCompressor.decompress(compressed, scheme)["weight"]
        module.weight.data = dense.float()
        dequantized[name] = dense.float().numpy()
    save_file(tensors, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
    quantization = QuantizationConfig(
        config_groups={"group_0": ATTENTION, "group_1": DOWN},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=["lm_head"],
    ).model_dump()
    quantization["sparsity_config"] = BitmaskConfig(
        targets=SPARSE, ignore=["lm_head"], global_sparsity=0.5
    ).model_dump()
    hf_config = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    hf_config["quantization_config"] = quantization
    (Path(path) / "config.json").write_text(json.dumps(hf_config, indent=2))
    np.savez(out_path, logits=logits(model, np.load(tokens_path)), **dequantized)


def check(tokens_path, *paths):
    for path in paths:
        _check(Path(path), tokens_path, Path(path) / "reference.npz")


def _check(path, tokens_path, out_path):
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    out = {}
    for group in config["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        for module in group["targets"]:
            keys = PackedQuantizationCompressor.compression_param_names(scheme)
            state = {key: tensors[f"{module}.{key}"] for key in keys}
            out[module] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
    sparsity = config.get("sparsity_config")
    if sparsity:
        BitmaskConfig.model_validate(sparsity)
        for module in sparsity["targets"]:
            shape = tensors[f"{module}.weight.shape"].tolist()
            mask = unpack_bitmasks(tensors[f"{module}.weight.bitmask"], shape)
            dense = torch.zeros(shape, dtype=tensors[f"{module}.weight.compressed"].dtype)
            dense[mask] = tensors[f"{module}.weight.compressed"]
            offsets = torch.cumsum(mask.sum(-1), 0) - mask.sum(-1)
            assert torch.equal(offsets, tensors[f"{module}.weight.row_offsets"]), module
            out[module] = dense.numpy()
    if sparsity:  # compressed-tensors >= 0.15 no longer decompresses sparse-bitmask
        np.savez(out_path, **out)
        return
    try:  # transformers + compressed-tensors load the directory (decompressing on CPU)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        out["logits"] = logits(model, np.load(tokens_path))
    except Exception as e:  # reported to the test, which decides
        out["transformers_error"] = np.asarray(f"{type(e).__name__}: {e}")
    np.savez(out_path, **out)


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](*sys.argv[2:])
