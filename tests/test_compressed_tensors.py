"""compressed-tensors interoperability, checked against the real package (HF venv).

``ct_reference.py`` compresses a tiny Llama with compressed-tensors for us to load,
and decompresses (and loads with transformers) what ``to_hf(format=
"compressed-tensors")`` writes.
"""

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_hf import TINY, hf_python

from pallax.models import Transformer, from_hf, linears, quantize_model, sparsify_model, to_hf
from pallax.pallas_kernels import QuantizedWeight, SparseWeight, quantize

REFERENCE = __import__("pathlib").Path(__file__).with_name("ct_reference.py")


def run_ct(*args):
    result = subprocess.run(
        [hf_python(), str(REFERENCE), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def hf_module(path: str) -> str:
    """``blocks.0.attention.q_proj`` -> ``model.layers.0.self_attn.q_proj``."""
    _, layer, rest = path.split(".", 2)
    return f"model.layers.{layer}.{rest.replace('attention.', 'self_attn.')}"


def dense(weight):
    return np.asarray(
        weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.todense()
    )


def mixed_model(sparse: bool) -> Transformer:
    """W4 g32 (k/v; asymmetric with ``sparse``), W4 (o), W8 (q), and sparse or W4 g32 MLPs."""
    model = Transformer(TINY, rngs=nnx.Rngs(5))
    for path, layer in linears(model):
        if path.endswith(("k_proj", "v_proj")):
            w = layer.kernel.get_value()
            layer.kernel.set_value(quantize(w, 4, 32, symmetric=not sparse))
    # W4 defaults to zero points; the model transformers loads must be symmetric.
    quantize_model(model, 4, symmetric=not sparse, layers=lambda p, _: p.endswith("o_proj"))
    quantize_model(model, 8, layers=lambda p, _: p.endswith("q_proj"))
    if sparse:
        sparsify_model(model, 0.6, layers=lambda p, _: ".mlp." in p)
    else:
        quantize_model(model, 4, group_size=32, symmetric=True, layers=lambda p, _: ".mlp." in p)
    return model


def test_loads_compressed_tensors_checkpoint_without_dense(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 96, (2, 12))
    np.save(tmp_path / "tokens.npy", tokens)
    run_ct("make", tmp_path, tmp_path / "tokens.npy", tmp_path / "ref.npz")
    reference = np.load(tmp_path / "ref.npz")
    model = from_hf(tmp_path, dtype="float32")
    kinds = {}
    for path, layer in linears(model):
        if not path.startswith("blocks."):
            continue
        weight = layer.kernel.get_value()
        kinds[path.split(".", 2)[2]] = (type(weight).__name__, getattr(weight, "bits", None))
        np.testing.assert_allclose(dense(weight).T, reference[hf_module(path)], rtol=1e-6)
    assert kinds["attention.q_proj"] == ("QuantizedWeight", 4)
    assert not model.blocks[0].attention.q_proj.kernel.get_value().symmetric
    assert kinds["mlp.down_proj"] == ("QuantizedWeight", 8)
    assert kinds["mlp.up_proj"] == ("SparseWeight", None)
    model.blocks[0].mlp.up_proj.kernel.get_value().validate()
    logits = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-5, rtol=1e-5)


def test_to_hf_compressed_tensors_decompresses_and_loads_in_transformers(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 96, (2, 12))
    np.save(tmp_path / "tokens.npy", tokens)
    models = {"sparse": mixed_model(sparse=True), "quantized": mixed_model(sparse=False)}
    for name, model in models.items():
        to_hf(model, tmp_path / name, format="compressed-tensors")
    run_ct("check", tmp_path / "tokens.npy", *(tmp_path / name for name in models))
    for name, model in models.items():
        reference = np.load(tmp_path / name / "reference.npz")
        for path, layer in linears(model):
            if path.startswith("blocks."):
                np.testing.assert_allclose(
                    dense(layer.kernel.get_value()).T, reference[hf_module(path)], rtol=1e-6
                )
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    # transformers (with compressed-tensors) serves the quantized export: same logits.
    # (Symmetric only: transformers 5.24 + compressed-tensors 0.20 reject packed zero
    # points, compressed-tensors' own asymmetric output included.)
    reference = np.load(tmp_path / "quantized" / "reference.npz")
    assert "transformers_error" not in reference, str(reference["transformers_error"])
    ours = np.asarray(models["quantized"](jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(reference["logits"], ours, atol=2e-5, rtol=2e-5)


def test_compressed_tensors_round_trip_is_exact(tmp_path):
    model = mixed_model(sparse=True)  # asymmetric k/v
    model.blocks[1].attention.q_proj.act_bits = 8  # W8A8 survives as int8 token activations
    to_hf(model, tmp_path, format="compressed-tensors", max_shard_bytes=40_000)
    reloaded = from_hf(tmp_path, dtype="float32")
    for (path, layer), (_, other) in zip(linears(model), linears(reloaded), strict=True):
        a, b = layer.kernel.get_value(), other.kernel.get_value()
        assert type(a) is type(b) and layer.act_bits == other.act_bits, path
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
    assert isinstance(reloaded.blocks[0].mlp.up_proj.kernel.get_value(), SparseWeight)


def test_compressed_tensors_errors_name_the_problem(tmp_path):
    model = mixed_model(sparse=False)
    with pytest.raises(ValueError, match="format='compressed-tensors'"):
        to_hf(model, tmp_path / "dense")
    to_hf(model, tmp_path, format="compressed-tensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="group_size 96"):
        from_hf(tmp_path)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        from_hf(tmp_path)


def test_compressed_tensors_load_onto_a_mesh(tmp_path):
    from pallax import sharding as ps

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    model = mixed_model(sparse=True)
    to_hf(model, tmp_path, format="compressed-tensors")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 96, (8, 8)), jnp.int32)
    # (tensor=2 would split the 64-input int4 o_proj below one 128-wide pack block)
    mesh = ps.make_mesh(data=4, fsdp=2)
    with jax.set_mesh(mesh):
        sharded = from_hf(tmp_path, mesh=mesh, dtype="float32")
        out = nnx.jit(lambda m, x: m(x))(sharded, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(tokens)), atol=1e-5, rtol=1e-5)
