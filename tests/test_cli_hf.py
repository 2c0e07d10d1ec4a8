"""The Hugging Face workflow from the CLI: a tiny random transformers Llama directory
(with a tokenizer.json) through ``convert -> generate -> eval``."""

import re

import jax
import numpy as np
import pytest
from test_hf import run_reference
from test_train import run_cli

from pallax.models import from_hf, generate, quantize_model
from pallax.pallas_kernels import QuantizedWeight, SparseWeight
from pallax.train import load_model
from pallax.train.data import HFTokenizer, default_corpus

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """transformers' tiny random Llama (vocab 96) plus a 96-token BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf")
    np.save(path / "tokens.npy", np.zeros((1, 4), np.int64))
    run_reference("make", "llama", path / "model", path / "tokens.npy", path / "ref.npy")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60
    )
    tokenizer.train_from_iterator([default_corpus()[:50_000]], trainer)
    tokenizer.save(str(path / "model" / "tokenizer.json"))
    return path / "model"


def perplexity(stdout: str) -> float:
    return float(re.search(r"perplexity\s+([0-9.]+)", stdout).group(1))


def test_generate_uses_the_directory_tokenizer(hf_dir):
    result = run_cli(["generate", "--checkpoint", str(hf_dir), "--prompt", PROMPT,
                      "--max-new-tokens", "8", "--temperature", "0"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = HFTokenizer(hf_dir / "tokenizer.json")
    model = from_hf(hf_dir, dtype="float32")
    # generation_config.json's eos_token_id (2) stops the sequence.
    new = generate(model, tokenizer.encode(PROMPT)[None], 8, stop_tokens=(2,))
    assert result.stdout.rstrip("\n") == PROMPT + tokenizer.decode(new[0])


def test_convert_streams_and_generate_eval_take_the_result(hf_dir, tmp_path):
    out = tmp_path / "w4"
    converted = run_cli(["convert", "--checkpoint", str(hf_dir), "--out", str(out),
                         "--quantize", "w4"])  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert (out / "tokenizer.json").is_file()
    # Quantized layer by layer as read: the same weights as quantizing the dense model.
    streamed, meta = load_model(out)
    expected = quantize_model(from_hf(hf_dir, dtype="float32"), 4)
    for a, b in zip(
        jax.tree.leaves(streamed.blocks[1].mlp.down_proj.kernel.get_value()),
        jax.tree.leaves(expected.blocks[1].mlp.down_proj.kernel.get_value()),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["method"] == "rtn"
    generated = run_cli(["generate", "--checkpoint", str(out), "--prompt", PROMPT,
                         "--max-new-tokens", "6"])  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith(PROMPT)
    flags = ["--seq-len", "32", "--batch-size", "2", "--max-batches", "2", "--decode-tokens", "4"]
    dense = run_cli(["eval", "--checkpoint", str(hf_dir), *flags])
    w4 = run_cli(["eval", "--checkpoint", str(out), *flags])
    assert dense.returncode == 0 and w4.returncode == 0, dense.stderr[-2000:] + w4.stderr[-2000:]
    # A random model over a 96-token vocab: perplexity near 96; W4 stays close to dense.
    assert 60 < perplexity(dense.stdout) < 150
    assert perplexity(w4.stdout) == pytest.approx(perplexity(dense.stdout), rel=0.05)
    assert "prefill" in w4.stdout and "tokens/s" in w4.stdout


def test_convert_with_calibration_to_compressed_tensors(hf_dir, tmp_path):
    out = tmp_path / "ct"
    converted = run_cli(["convert", "--checkpoint", str(hf_dir), "--out", str(out),
                         "--method", "wanda", "--sparsity", "0.5", "--seq-len", "64",
                         "--format", "compressed-tensors"])  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    model = from_hf(out)  # the compressed-tensors directory loads like any HF directory
    up = model.blocks[0].mlp.up_proj.kernel.get_value()
    assert isinstance(up, SparseWeight) and up.sparsity == pytest.approx(0.5, abs=0.01)
    assert not isinstance(model.lm_head.kernel.get_value(), QuantizedWeight | SparseWeight)
    evaluated = run_cli(["eval", "--checkpoint", str(out), "--seq-len", "32", "--batch-size",
                         "2", "--max-batches", "1", "--decode-tokens", "2"])  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 60 < perplexity(evaluated.stdout) < 150


@pytest.mark.parametrize(
    "flags, message",
    [
        (["convert", "--method", "wanda", "--quantize", "w4"], "--method wanda does not quantize"),
        (["eval", "--max-batches", "0"], "--max-batches must be >= 1"),
        (["generate", "--prompt", "x", "--step", "3"], "--step does not apply"),
    ],
)
def test_cli_hf_bad_input(hf_dir, tmp_path, flags, message):
    args = [*flags, "--checkpoint", str(hf_dir)]
    if flags[0] == "convert":
        args += ["--out", str(tmp_path / "x")]
    result = run_cli(args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr[-2000:]


def test_generate_needs_a_tokenizer(hf_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(hf_dir / name)
    result = run_cli(["generate", "--checkpoint", str(bare), "--prompt", "x"], timeout=120)
    assert result.returncode == 2
    assert "has no tokenizer.json" in result.stderr, result.stderr[-2000:]
