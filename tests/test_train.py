"""pallax.train: loss falls, resume is exact, multi-host == one host, sparse masks
stay fixed, quantized weights stay frozen, checkpoints round-trip, CLI errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallax import sharding as ps
from pallax.models import Transformer, quantize_model, sparsify_model
from pallax.pallas_kernels import QuantizedWeight, SparseWeight
from pallax.train import Checkpointer, Trainer, load_config, load_model, preset_config
from pallax.train.config import TrainConfig, from_dict
from pallax.train.data import ByteTokenizer, TokenDataset, default_corpus, train_batch
from pallax.train.metrics import attended_keys, training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = dict(
    embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, sliding_window=16
)
# Flags for the subprocess runs (kept small: each is a fresh process on 2 CI cores).
SMALL_FLAGS = [
    "--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--set", "log_every=1",
    "--set", "eval_every=0", "--no-progress",
    *[arg for key, value in SMALL_MODEL.items() for arg in ("--set", f"model.{key}={value}")],
]  # fmt: skip


def small_config(**changes) -> TrainConfig:
    base = dict(
        model=SMALL_MODEL, seq_len=32, batch_size=8, steps=30, learning_rate=3e-3,
        warmup_steps=5, log_every=5, eval_every=15, eval_batches=2, checkpoint_every=0,
    )  # fmt: skip
    return from_dict({**base, **changes})


def single_device_mesh():
    return ps.make_mesh(devices=jax.devices()[:1])


def run_cli(args, *, devices=1, env_extra=None, timeout=600, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, "-m", "pallax", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs,
    )  # fmt: skip


def losses(path) -> dict[int, float]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# -- data ---------------------------------------------------------------------------------


def test_corpus_tokenizer_and_batches_are_deterministic():
    text = default_corpus()
    assert len(text) > 400_000 and "for_stmt" not in text[:10]  # real prose, no download
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode(text)
    assert tokenizer.decode(tokens[:2000]) == text.encode()[:2000].decode("utf-8", "replace")
    dataset = TokenDataset.split(tokens, 64)
    assert 0.03 < len(dataset.validation) / len(tokens) < 0.07
    a = train_batch(dataset, seed=3, step=17, batch_size=4, seq_len=64)
    b = train_batch(dataset, seed=3, step=17, batch_size=4, seq_len=64)
    c = train_batch(dataset, seed=3, step=18, batch_size=4, seq_len=64)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 65) and not np.array_equal(a, c)
    # Each row is a contiguous window of the training stream (not of validation).
    train_bytes = dataset.train.astype(np.uint8).tobytes()
    for row in np.asarray(a):
        assert train_bytes.find(row.astype(np.uint8).tobytes()) >= 0


def test_hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        [default_corpus()[:50_000]], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"])
    )
    path = tmp_path / "tok.json"
    tok.save(str(path))
    config = small_config(tokenizer=str(path), steps=2, eval_every=0)
    with pytest.raises(ValueError, match="vocab_size=256 is smaller"):
        Trainer(config, mesh=single_device_mesh(), progress=False)
    config = config.replace(model=dict(vocab_size=320))
    trainer = Trainer(config, mesh=single_device_mesh(), progress=False)
    assert trainer.tokenizer.vocab_size == 300
    assert np.isfinite(trainer.fit()[-1]["loss"])


# -- training -----------------------------------------------------------------------------


def test_loss_decreases_on_embedded_corpus():
    trainer = Trainer(small_config(steps=40), mesh=single_device_mesh(), progress=False)
    history = trainer.fit()
    train = [r["loss"] for r in history if "loss" in r]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert val[0] > 5.0  # ~log(256) at init
    assert val[-1] < val[0] - 2.0 and train[-1] < train[0] - 0.8, history
    assert all(r["tokens_per_s"] > 0 and r["step_time"] > 0 for r in history if "loss" in r)


def test_grad_accumulation_matches_one_big_batch():
    def one_step(grad_accum):
        trainer = Trainer(
            small_config(steps=1, grad_accum=grad_accum, eval_every=0),
            mesh=single_device_mesh(),
            progress=False,
        )
        trainer.fit()
        return jax.tree.leaves(trainer.params)

    for a, b in zip(one_step(1), one_step(4), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_sharded_training_matches_single_device():
    """data=2 x fsdp=2 x tensor=2 on 8 fake devices == one device, step for step."""
    config = small_config(steps=3, eval_every=0, log_every=1)
    single = Trainer(config, mesh=single_device_mesh(), progress=False).fit()
    sharded = Trainer(config.replace(mesh="data=2,fsdp=2,tensor=2"), progress=False)
    assert sharded.mesh.shape["tensor"] == 2
    history = sharded.fit()
    np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in single], rtol=2e-3)


# Gemma 2/3 + Qwen options on the small model: local layers of 16 with halo exchange
# over the sequence axis, the global layer's ring attention, soft caps, biases, q/k norms.
FAMILY_MODEL = dict(
    SMALL_MODEL,
    num_layers=3,
    sliding_window=None,
    layer_windows=[16, 16, None],
    qkv_bias=True,
    qk_norm=True,
    norm_weight_offset=1.0,
    sandwich_norms=True,
    mlp_activation="gelu_tanh",
    scale_embeddings=True,
    query_pre_attn_scalar=24.0,
    attention_logits_soft_cap=5.0,
    final_logits_soft_cap=10.0,
    local_rope_theta=1e4,
    sequence_method="halo",
)


def test_family_options_train_sharded_like_on_one_device():
    """fsdp x sequence x tensor = 2 x 2 x 2 steps == one device, for a Gemma/Qwen-style model;
    its config survives the checkpoint's JSON description."""
    config = small_config(steps=2, eval_every=0, log_every=1, model=FAMILY_MODEL)
    assert from_dict(json.loads(config.to_json())) == config
    single = Trainer(config, mesh=single_device_mesh(), progress=False).fit()
    sharded = Trainer(config.replace(mesh="fsdp=2,sequence=2,tensor=2"), progress=False)
    history = sharded.fit()
    np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in single], rtol=2e-3)


@pytest.mark.parametrize(
    "variant, mesh",
    [
        ("sparse70", "data=2,fsdp=2,tensor=2"),
        ("sparse70", "data=2,fsdp=4"),  # ZeRO-3 values without tensor parallelism
        ("w8a8", "data=2,fsdp=2,tensor=2"),
    ],
)
def test_converted_models_train_sharded_like_on_one_device(variant, mesh):
    """Sparse values and the layers around frozen quantized weights train on a
    mesh as on one device (gradients cross the tensor-parallel sparse /
    quantized linears); sparse values and their Adam moments are split over
    tensor x fsdp."""
    model = dict(SMALL_MODEL, embed_dim=256, mlp_dim=512)  # 128-input groups split 2 ways
    config = small_config(steps=2, eval_every=0, log_every=1, model=model)
    base = Transformer(config.model, rngs=nnx.Rngs(0))
    if variant == "sparse70":
        sparsify_model(base, 0.7)
    else:
        quantize_model(base, 8, act_bits=8)
    single = Trainer(config, model=nnx.clone(base), mesh=single_device_mesh(), progress=False)
    sharded = Trainer(config.replace(mesh=mesh), model=nnx.clone(base), progress=False)
    expected = [r["loss"] for r in single.fit()]
    np.testing.assert_allclose([r["loss"] for r in sharded.fit()], expected, rtol=1e-3)
    if variant == "sparse70":
        values = sharded.model.blocks[0].mlp.up_proj.kernel.get_value().stacked.values
        moments = [
            leaf
            for leaf in jax.tree.leaves(sharded.opt_state)
            if getattr(leaf, "shape", None) == values.shape
        ]
        assert moments  # Adam's mu and nu (of this and any same-shaped layer)
        for array in (values, *moments):
            assert array.addressable_shards[0].data.nbytes * 4 == array.nbytes


def test_sparse_finetuning_keeps_the_mask():
    model = Transformer(from_dict({"model": SMALL_MODEL}).model, rngs=nnx.Rngs(0))
    sparsify_model(model, 0.7)
    before = nnx.clone(model)
    trainer = Trainer(small_config(steps=3, eval_every=0), model=model, mesh=single_device_mesh(),
                      progress=False)  # fmt: skip
    trainer.fit()
    after = trainer.model
    old = before.blocks[0].mlp.up_proj.kernel.get_value()
    new = after.blocks[0].mlp.up_proj.kernel.get_value()
    assert isinstance(new, SparseWeight)
    np.testing.assert_array_equal(new.bitmap, old.bitmap)
    np.testing.assert_array_equal(new.tile_offsets, old.tile_offsets)
    assert not np.allclose(new.values, old.values)  # the nonzeros trained
    dense_new, dense_old = np.asarray(new.todense()), np.asarray(old.todense())
    np.testing.assert_array_equal(dense_new != 0, dense_old != 0)
    assert abs(new.sparsity - 0.7) < 0.01


def test_quantized_weights_stay_frozen_while_the_rest_trains():
    model = Transformer(from_dict({"model": SMALL_MODEL}).model, rngs=nnx.Rngs(0))
    quantize_model(model, 8, act_bits=8)
    q_before = model.blocks[1].attention.q_proj.kernel.get_value()
    norm_before = np.asarray(model.blocks[1].input_norm.scale.get_value())
    trainer = Trainer(small_config(steps=3, eval_every=0), model=model, mesh=single_device_mesh(),
                      progress=False)  # fmt: skip
    history = trainer.fit()
    q_after = trainer.model.blocks[1].attention.q_proj.kernel.get_value()
    assert isinstance(q_after, QuantizedWeight)
    for a, b in zip(jax.tree.leaves(q_before), jax.tree.leaves(q_after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(trainer.model.blocks[1].input_norm.scale.get_value(), norm_before)
    assert np.isfinite(history[-1]["loss"])


def test_checkpoint_round_trip_for_dense_sparse_and_quantized(tmp_path):
    config = small_config(steps=2, eval_every=0)
    trainer = Trainer(config, output_dir=tmp_path / "run", mesh=single_device_mesh(),
                      progress=False)  # fmt: skip
    trainer.fit()
    trainer.close()
    tokens = jnp.asarray(train_batch(trainer.dataset, 0, 0, 2, 32)[:, :-1])
    model, meta = load_model(tmp_path / "run" / "checkpoints")
    assert meta["step"] == 2
    np.testing.assert_array_equal(model(tokens), trainer.model(tokens))
    for name, convert in (
        ("sparse", lambda m: sparsify_model(m, 0.6)),
        ("w8a8", lambda m: quantize_model(m, 8, act_bits=8)),
    ):
        converted = convert(nnx.clone(trainer.model))
        from pallax.train.checkpoint import weight_descriptions

        checkpointer = Checkpointer(tmp_path / name)
        checkpointer.save(
            2, nnx.state(converted, nnx.Param), None,
            {"config": meta["config"], "weights": weight_descriptions(converted)}, force=True,
        )  # fmt: skip
        checkpointer.wait()
        loaded, _ = load_model(tmp_path / name)
        np.testing.assert_array_equal(loaded(tokens), converted(tokens))
        # And sharded over tensor=2: sparse repacked per shard, quantized split
        # (the 64-wide row-parallel inputs are one 128-group: a clear error).
        mesh = ps.make_mesh(tensor=2, devices=jax.devices()[:2])
        if name != "sparse":
            with pytest.raises(
                ValueError, match=r"blocks\.\d+\.\w+\.\w+_proj: quantized weight .* cannot be split"
            ):
                load_model(tmp_path / name, mesh=mesh)
            continue
        sharded, _ = load_model(tmp_path / name, mesh=mesh)
        expected = converted(tokens)
        with jax.set_mesh(mesh):
            np.testing.assert_allclose(sharded(tokens), expected, atol=2e-2, rtol=2e-2)


def test_unfinished_checkpoint_is_ignored(tmp_path):
    """Orbax commits by renaming a temporary directory: a save killed midway
    leaves only the temporary directory, which restore never picks up."""
    trainer = Trainer(small_config(steps=2, eval_every=0), output_dir=tmp_path,
                      mesh=single_device_mesh(), progress=False)  # fmt: skip
    trainer.fit()
    trainer.close()
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\0" * 100)
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    resumed = Trainer(small_config(steps=2, eval_every=0), output_dir=tmp_path,
                      mesh=single_device_mesh(), progress=False)  # fmt: skip
    assert resumed.step == 2


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path):
    flags = [*SMALL_FLAGS, "--steps", "14", "--set", "checkpoint_every=3"]
    reference = run_cli(["train", *flags, "--out", str(tmp_path / "ref")], devices=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(expected) == list(range(1, 15))

    # Start the same run, SIGKILL it mid-way, then resume with the same command.
    out = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "pallax", "train", *flags, "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and max(losses(metrics), default=0) >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(losses(out / "metrics.jsonl")) < 14
    resumed = run_cli(["train", *flags, "--out", str(out)], devices=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    got = losses(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, 15))
    np.testing.assert_allclose([got[s] for s in range(1, 15)],
                               [expected[s] for s in range(1, 15)], rtol=1e-6)  # fmt: skip


def test_two_process_run_matches_one_process(tmp_path):
    flags = [*SMALL_FLAGS, "--steps", "3", "--mesh", "data=2,tensor=2", "--set",
             "checkpoint_every=3"]  # fmt: skip
    single = run_cli(["train", *flags, "--out", str(tmp_path / "one")], devices=4)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")  # fmt: skip
    multi = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pallax",
                "train",
                *flags,
                "--out",
                str(tmp_path / "two"),
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for process in multi:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    one, two = (
        losses(tmp_path / "one" / "metrics.jsonl"),
        losses(tmp_path / "two" / "metrics.jsonl"),
    )
    assert sorted(two) == [1, 2, 3]
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
    # The sharded multi-host checkpoint restores in one process.
    model, meta = load_model(tmp_path / "two" / "checkpoints")
    assert meta["step"] == 3


# -- metrics ------------------------------------------------------------------------------


def test_flops_count_matches_a_brute_force_mask_count():
    for seq_len, left in ((128, None), (128, 15), (100, 99), (64, 200)):
        mask = np.tril(np.ones((seq_len, seq_len), bool))
        if left is not None:
            mask &= ~np.tril(np.ones((seq_len, seq_len), bool), -left - 1)
        assert attended_keys(seq_len, left) == pytest.approx(mask.sum() / seq_len)
    config = from_dict({"model": dict(SMALL_MODEL, sliding_window=None)}).model
    e, d, f, v = 64, 16, 128, 256
    dense = 2 * (2 * (e * 4 * d * 2 + e * 2 * d * 2 + 3 * e * f) + e * v)
    attention = 2 * 4 * 4 * d * (64 + 1) / 2
    assert training_flops_per_token(config, 64) == pytest.approx(3 * (dense + attention))


# -- configuration and CLI ----------------------------------------------------------------


def test_config_files_and_validation(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nsteps = 7\n[model]\nsliding_window = 32\n')
    config = load_config(toml)
    assert config.steps == 7 and config.model.sliding_window == 32
    assert config.model.embed_dim == preset_config("tiny").model.embed_dim
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="unknown training setting.*stepz"):
        load_config(bad)
    bad.write_text(json.dumps({"model": {"heads": 3}}))
    with pytest.raises(ValueError, match="unknown model setting.*heads"):
        load_config(bad)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by grad_accum=4"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ValueError, match="must divide over data x fsdp = 8"):
        Trainer(small_config(batch_size=4), progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--steps", "0"], "steps must be >= 1, got 0"),
        (["train", "--mesh", "data=3,tensor=5"], "mesh"),
        (["train", "--set", "model.num_kv_heads=3"], "num_kv_heads=3 must divide num_heads=8"),
        (["train", "--config", "missing.toml"], "config file 'missing.toml' not found"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--stepz", "3"], "unrecognized arguments: --stepz"),
        (["generate", "--checkpoint", "nowhere", "--prompt", "x"], "'nowhere' not found"),
        (["convert", "--checkpoint", "nowhere", "--out", "x"], "nothing to do"),
        (
            ["convert", "--checkpoint", "x", "--out", "y", "--quantize", "w4", "--act-order"],
            "--act-order needs --quant-method gptq",
        ),
        (["train", "--data", "no-such-file.txt"], "training data 'no-such-file.txt' not found"),
    ],
)
def test_cli_rejects_bad_input_clearly(args, message):
    result = run_cli(args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_cli_train_convert_generate(tmp_path):
    run = tmp_path / "run"
    trained = run_cli(["train", *SMALL_FLAGS, "--steps", "3", "--out", str(run)])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "checkpoints" / "3").is_dir()
    for name, flags in (
        ("sparse", ["--sparsity", "0.7"]),
        ("w4", ["--quantize", "w4"]),
        ("gptq", ["--quantize", "w4", "--quant-method", "gptq", "--act-order"]),
    ):
        converted = run_cli(["convert", "--checkpoint", str(run), "--out", str(tmp_path / name),
                             *flags])  # fmt: skip
        assert converted.returncode == 0, converted.stderr[-3000:]
        generated = run_cli(["generate", "--checkpoint", str(tmp_path / name), "--prompt",
                             "The ", "--max-new-tokens", "8"])  # fmt: skip
        assert generated.returncode == 0, generated.stderr[-3000:]
        assert generated.stdout.startswith("The ")
    # Fine-tune the sparse checkpoint; its mask survives the CLI round trip.
    tuned = run_cli(["train", "--init-from", str(tmp_path / "sparse"), "--steps", "5",
                     "--batch-size", "4", "--seq-len", "32", "--no-progress",
                     "--out", str(tmp_path / "tuned")])  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    base, _ = load_model(tmp_path / "sparse")
    tuned_model, meta = load_model(tmp_path / "tuned" / "checkpoints")
    assert meta["step"] == 5
    a = base.blocks[0].mlp.down_proj.kernel.get_value()
    b = tuned_model.blocks[0].mlp.down_proj.kernel.get_value()
    np.testing.assert_array_equal(a.bitmap, b.bitmap)


def test_demo_end_to_end_at_reduced_steps(tmp_path):
    result = run_cli(["demo", "--steps", "6", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    for variant in ("dense", "70% sparse + fine-tune", "W8A8", "W4A16"):
        assert variant in result.stdout
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by_name = {r["model"].split(" (")[0]: r for r in rows}
    assert by_name["W4A16"]["bytes"] < by_name["W8A8"]["bytes"] < by_name["dense"]["bytes"]
    assert all(np.isfinite(r["val_loss"]) and r["gen_tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_quickstart_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel is a fresh process: one CPU device, like a user's laptop.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    path = ROOT / "examples" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit the notebook with outputs stripped"
    )
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "max |pallax - jax.nn|" in text and "W4A16" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot


def test_tensor_parallel_sparse_checkpoint_loads_on_any_mesh(tmp_path):
    """A run on data=2 x fsdp=2 x tensor=2 saves per-shard sparse packs; they load
    on one device (merged), on tensor=2 and on the run's own mesh."""
    config = small_config(steps=2, eval_every=0, checkpoint_every=2)
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    sparsify_model(model, 0.7)
    trainer = Trainer(
        config.replace(mesh="data=2,fsdp=2,tensor=2"),
        model=model,
        output_dir=tmp_path,
        progress=False,
    )
    trainer.fit()
    trainer.close()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)
    with jax.set_mesh(trainer.mesh):
        expected = np.asarray(trainer.model(tokens), np.float32)
    single, _ = load_model(tmp_path / "checkpoints")
    assert isinstance(single.blocks[0].mlp.up_proj.kernel.get_value(), SparseWeight)
    np.testing.assert_allclose(np.asarray(single(tokens), np.float32), expected, atol=2e-2)
    for mesh in (ps.make_mesh(tensor=2, devices=jax.devices()[:2]), trainer.mesh):
        loaded, _ = load_model(tmp_path / "checkpoints", mesh=mesh)
        with jax.set_mesh(mesh):
            got = np.asarray(loaded(tokens), np.float32)
        np.testing.assert_allclose(got, expected, atol=2e-2)


def test_cli_trains_and_generates_a_gemma_style_model(tmp_path):
    """`pallax train --set model.<family option>=...` then `pallax generate` from its
    checkpoint (the options are recorded in the checkpoint's description)."""
    options = {k: v for k, v in FAMILY_MODEL.items() if k not in SMALL_MODEL or SMALL_MODEL[k] != v}
    options["sequence_method"] = "ulysses"
    flags = [arg for k, v in options.items() for arg in ("--set", f"model.{k}={json.dumps(v)}")]
    run = tmp_path / "run"
    trained = run_cli(["train", *SMALL_FLAGS, *flags, "--steps", "2", "--out", str(run)])
    assert trained.returncode == 0, trained.stderr[-3000:]
    model, _ = load_model(run / "checkpoints")
    assert model.config.attention_logits_soft_cap == 5.0 and model.config.layer_windows == (
        16,
        16,
        None,
    )
    generated = run_cli(["generate", "--checkpoint", str(run), "--prompt", "The ",
                         "--max-new-tokens", "20"])  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("The ")
