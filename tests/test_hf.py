"""Logit parity with Hugging Face transformers (torch CPU) through from_hf / to_hf.

The reference runs in a separate Python 3.11 venv (``make test`` builds
``.venv-hf``; its python is passed in ``PALLAX_HF_PYTHON``).
"""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallax.models import RopeScaling, Transformer, TransformerConfig, generate
from pallax.models.hf import config_to_hf, from_hf, to_hf

REFERENCE = Path(__file__).with_name("hf_reference.py")
# Mirrors hf_reference.tiny_config (Llama flavour; Mistral adds a window).
TINY = TransformerConfig(
    vocab_size=96,
    embed_dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=160,
    dtype="float32",
)


def hf_python() -> str:
    python = os.environ.get("PALLAX_HF_PYTHON") or str(
        Path(__file__).resolve().parents[1] / ".venv-hf" / "bin" / "python"
    )
    if not Path(python).exists():
        pytest.fail(f"no Hugging Face reference venv at {python}: run `make test`")
    return python


def run_reference(*args):
    result = subprocess.run(
        [hf_python(), str(REFERENCE), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["llama", "llama3", "linear", "mistral"])
def test_from_hf_matches_transformers_logits(kind, tmp_path):
    tokens = np.random.default_rng(0).integers(0, 96, (2, 20))
    np.save(tmp_path / "tokens.npy", tokens)
    run_reference("make", kind, tmp_path / kind, tmp_path / "tokens.npy", tmp_path / "ref.npy")
    model = from_hf(tmp_path / kind, dtype="float32")
    if kind == "mistral":  # the window (6) is shorter than the sequence (20)
        assert model.config.sliding_window == 6
    if kind in ("llama3", "linear"):
        assert model.config.rope_scaling.kind == kind
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(ours, np.load(tmp_path / "ref.npy"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "rope_scaling", [None, RopeScaling("llama3", 4.0, 1.0, 2.0, original_max_positions=24)]
)
def test_to_hf_round_trip_loads_in_transformers(rope_scaling, tmp_path):
    config = dataclasses.replace(TINY, sliding_window=5, rope_scaling=rope_scaling)
    model = Transformer(config, rngs=nnx.Rngs(3))
    tokens = np.random.default_rng(1).integers(0, 96, (2, 16))
    np.save(tmp_path / "tokens.npy", tokens)
    to_hf(model, tmp_path / "export", max_shard_bytes=100_000)  # several shard files
    assert len(list((tmp_path / "export").glob("model-*.safetensors"))) > 1
    run_reference("logits", tmp_path / "export", tmp_path / "tokens.npy", tmp_path / "ref.npy")
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(ours, np.load(tmp_path / "ref.npy"), atol=2e-5, rtol=2e-5)
    # Our own loader reads the sharded export back exactly, and generates the same.
    reloaded = from_hf(tmp_path / "export", dtype="float32")
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(tokens, jnp.int32))), ours)
    np.testing.assert_array_equal(
        np.asarray(generate(reloaded, tokens[:, :4], 6)),
        np.asarray(generate(model, tokens[:, :4], 6)),
    )


def test_from_hf_rejects_unsupported_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        from_hf(tmp_path)
    yarn = {**config_to_hf(TINY), "rope_scaling": {"type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(yarn))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        from_hf(tmp_path)


def test_rope_scaling_config_round_trips_and_validates():
    from pallax.train.config import TrainConfig, from_dict, to_dict

    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    config = TrainConfig(model=dataclasses.replace(TINY, rope_scaling=scaling))
    restored = from_dict(json.loads(json.dumps(to_dict(config))))
    assert restored.model.rope_scaling == scaling
    assert TransformerConfig(rope_scaling={"kind": "linear", "factor": 2.0}).rope_scaling == (
        RopeScaling("linear", 2.0)
    )
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="kind 'ntk'"):
        RopeScaling("ntk")


def test_from_hf_streams_onto_a_mesh(tmp_path):
    import jax

    from pallax import sharding as ps

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    model = Transformer(TINY, rngs=nnx.Rngs(4))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 96, (4, 8)), jnp.int32)
    to_hf(model, tmp_path)
    mesh = ps.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        sharded = from_hf(tmp_path, mesh=mesh, dtype="float32")
        up = sharded.blocks[1].mlp.up_proj.kernel.get_value()
        assert up.sharding.spec == ps.logical_to_spec(("embed", "mlp"))
        assert up.addressable_shards[0].data.nbytes == up.nbytes // 4
        out = nnx.jit(lambda m, x: m(x))(sharded, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(tokens)), atol=1e-5, rtol=1e-5)


# Qwen2.5 / Qwen3 / Gemma 2 / Gemma 3: tiny random configs (hf_reference.family_config)
# with weights perturbed off their zero/one inits, windows of 6 over 20-token inputs.
FAMILY_CASES = {
    "qwen2": dict(qkv_bias=True, layer_windows=(None, 6)),
    "qwen3": dict(qk_norm=True, head_dim=32, layer_windows=None, sliding_window=None),
    "gemma2": dict(
        sandwich_norms=True,
        norm_weight_offset=1.0,
        mlp_activation="gelu_tanh",
        scale_embeddings=True,
        query_pre_attn_scalar=24.0,
        attention_logits_soft_cap=3.0,
        final_logits_soft_cap=2.0,
        layer_windows=(6, None, 6),
        tie_embeddings=False,
    ),
    "gemma3": dict(
        qk_norm=True,
        sandwich_norms=True,
        attention_logits_soft_cap=None,
        final_logits_soft_cap=2.0,
        layer_windows=(6, 6, None),
        tie_embeddings=True,
        rope_theta=1e6,
        rope_scaling=RopeScaling("linear", 2.0),
        local_rope_theta=1e4,
    ),
}
# A feature the parity must depend on: dropping it moves the logits far off.
ESSENTIAL = {
    "qwen2": "qkv_bias",
    "qwen3": "qk_norm",
    "gemma2": "attention_logits_soft_cap",
    "gemma3": "local_rope_theta",
}


def without_feature(model, **changes):
    """The same weights in a model whose config lacks a feature (its own tensors dropped)."""
    config = dataclasses.replace(model.config, **changes)
    other = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    values = dict(nnx.to_flat_state(nnx.state(model)))
    state = nnx.state(other)
    for path, variable in nnx.to_flat_state(state):
        variable.set_value(values[path].get_value())
    nnx.update(other, state)
    return other


@pytest.mark.parametrize("kind", list(FAMILY_CASES))
def test_family_matches_transformers_and_round_trips(kind, tmp_path):
    """Logits == transformers (fp32); greedy generation past the window (6) with our
    ring caches == transformers' generate (Gemma 3's tied tiny model just repeats
    tokens; the others vary); to_hf output loads in transformers."""
    tokens = np.random.default_rng(0).integers(0, 96, (2, 20))
    np.save(tmp_path / "tokens.npy", tokens)
    run_reference(
        "make", kind, tmp_path / kind, tmp_path / "tokens.npy", tmp_path / "ref.npy",
        8, 12, tmp_path / "generated.npy",
    )  # fmt: skip
    model = from_hf(tmp_path / kind, dtype="float32")
    for field, value in FAMILY_CASES[kind].items():
        assert getattr(model.config, field) == value, field
    ref = np.load(tmp_path / "ref.npy")
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=3e-5, rtol=3e-5)
    off = {ESSENTIAL[kind]: False if ESSENTIAL[kind].endswith(("bias", "norm")) else None}
    without = np.asarray(without_feature(model, **off)(jnp.asarray(tokens, jnp.int32)))
    assert np.abs(without - ref).max() > 0.1
    generated = np.load(tmp_path / "generated.npy")
    np.testing.assert_array_equal(np.asarray(generate(model, tokens[:, :8], 12)), generated)
    to_hf(model, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    original = json.loads((tmp_path / kind / "config.json").read_text())
    assert exported["architectures"] == original["architectures"]
    run_reference("logits", tmp_path / "export", tmp_path / "tokens.npy", tmp_path / "back.npy")
    np.testing.assert_allclose(np.load(tmp_path / "back.npy"), ref, atol=3e-5, rtol=3e-5)


def write_config(path, hf):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    return path


# A Gemma-2-shaped TransformerConfig (no HF needed).
GEMMA_TINY = dataclasses.replace(
    TINY,
    sandwich_norms=True,
    norm_weight_offset=1.0,
    mlp_activation="gelu_tanh",
    scale_embeddings=True,
    query_pre_attn_scalar=16.0,
    layer_windows=(4, None),
    tie_embeddings=True,
    attention_logits_soft_cap=20.0,
    final_logits_soft_cap=10.0,
)
BASES = {"llama": TINY, "qwen2": dataclasses.replace(TINY, qkv_bias=True), "gemma2": GEMMA_TINY}


@pytest.mark.parametrize(
    "base, changes, message",
    [
        ("llama", {"attention_bias": True}, "attention_bias=True"),
        ("qwen2", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("qwen2", {"layer_types": ["chunked_attention", "full_attention"]}, "chunked_attention"),
        ("qwen2", {"architectures": ["Gemma3ForConditionalGeneration"]}, "has no text_config"),
    ],
)
def test_family_variants_are_rejected_by_name(base, changes, message, tmp_path):
    hf = {**config_to_hf(BASES[base]), **changes}
    with pytest.raises(ValueError, match=message):
        from_hf(write_config(tmp_path / "model", hf))


def test_to_hf_rejects_options_its_family_cannot_hold():
    with pytest.raises(
        ValueError, match="no LlamaForCausalLM equivalent: attention_logits_soft_cap"
    ):
        config_to_hf(dataclasses.replace(TINY, attention_logits_soft_cap=30.0))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM equivalent: scale_embeddings"):
        config_to_hf(dataclasses.replace(TINY, qk_norm=True, scale_embeddings=True))
    with pytest.raises(ValueError, match="one sliding window for all local layers"):
        config_to_hf(
            dataclasses.replace(
                TINY, sandwich_norms=True, layer_windows=(4, 8), norm_weight_offset=1.0
            )
        )


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration: text weights under model.language_model.*, vision
    tensors ignored with a warning; same logits as the text-only export."""
    from safetensors.numpy import load_file, save_file

    config = dataclasses.replace(
        GEMMA_TINY,
        qk_norm=True,
        attention_logits_soft_cap=None,
        local_rope_theta=1e4,
        rope_theta=1e6,
    )
    text = Transformer(config, rngs=nnx.Rngs(5))
    to_hf(text, tmp_path / "text")
    tensors = load_file(tmp_path / "text" / "model.safetensors")
    multimodal = {"model.language_model." + k[len("model.") :]: v for k, v in tensors.items()}
    multimodal["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = np.ones(
        (4, 4), np.float32
    )
    (tmp_path / "mm").mkdir()
    save_file(multimodal, tmp_path / "mm" / "model.safetensors")
    text_config = json.loads((tmp_path / "text" / "config.json").read_text())
    write_config(
        tmp_path / "mm",
        {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text_config,
            "vision_config": {"model_type": "siglip_vision_model"},
        },
    )
    with pytest.warns(UserWarning, match="loading the text model only"):
        loaded = from_hf(tmp_path / "mm", dtype="float32")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 96, (2, 12)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(text(tokens)))
