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
