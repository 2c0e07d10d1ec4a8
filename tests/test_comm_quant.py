"""pallax.sharding.comm_quant: quantized fsdp collectives (qwZ, hpZ, qgZ, SDP4Bit) and
training with them: round-trip bounds, exact gathers, gradient bounds, HLO bytes vs the
formula, loss / accumulation / resume equivalence, a 2-process run, clear errors."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallax import sharding as ps
from pallax.__main__ import main as cli_main
from pallax.models import Transformer, quantize_model, sparsify_model
from pallax.sharding import comm_quant as cq
from pallax.train import Trainer
from pallax.train.config import from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.comm_quant import collective_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = dict(
    embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, sliding_window=16
)


def small_config(**changes):
    base = dict(
        model=SMALL_MODEL, seq_len=32, batch_size=8, steps=4, learning_rate=3e-3,
        warmup_steps=1, log_every=1, eval_every=0, checkpoint_every=0, mesh="data=2,fsdp=4",
    )  # fmt: skip
    return from_dict({**base, **changes})


def fit(config, **kwargs):
    trainer = Trainer(config, progress=False, log=lambda *_: None, **kwargs)
    history = trainer.fit()
    return trainer, np.array([r["loss"] for r in history if "loss" in r])


# -- block quantization -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step(rng, bits):
    x = rng.standard_normal((3, 1000)).astype(np.float32) * np.array([[1e-3], [1.0], [50.0]])
    x[1, :128] = 0.0  # an all-zero block comes back exactly
    codes, scales = cq.quantize_blocks(jnp.asarray(x), bits, 128)
    assert codes.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert codes.shape == (3, 8, 128 * bits // 8) and scales.shape == (3, 8)
    back = np.asarray(cq.dequantize_blocks(codes, scales, bits, 1000))
    step = np.repeat(np.asarray(scales), 128, axis=1)[:, :1000]
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(back[1, :128] == 0)
    # A block's extreme value is represented exactly (absmax scaling).
    i = np.abs(x[2, :128]).argmax()
    np.testing.assert_allclose(back[2, i], x[2, i], rtol=1e-6)


def test_hadamard_rotation_tames_an_outlier(rng):
    x = rng.standard_normal((1, 4 * 128)).astype(np.float32)
    x[0, ::128] = 100.0  # one outlier per block: plain int4 rounds the rest to zero
    plain = np.asarray(cq.round_trip(jnp.asarray(x), 4, 128))
    rotated = np.asarray(cq.round_trip(jnp.asarray(x), 4, 128, hadamard=True))
    h = cq.hadamard_matrix(128)
    np.testing.assert_allclose(h @ h, np.eye(128), atol=1e-6)
    plain_error, rotated_error = np.linalg.norm(plain - x), np.linalg.norm(rotated - x)
    assert rotated_error < 0.6 * plain_error, (rotated_error, plain_error)


# -- collectives on 8 devices -------------------------------------------------------------


def _mesh(**sizes):
    return ps.make_mesh(**{"data": 1, **sizes})


@pytest.mark.parametrize("bits", [8, 4, None])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantized_all_gather_equals_dequantized_shards(rng, bits, axis):
    mesh = _mesh(fsdp=8)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    spec = P(ps.FSDP, None) if axis == 0 else P(None, ps.FSDP)
    gather = jax.jit(
        jax.shard_map(
            lambda s: cq.quantized_all_gather(s, axis, bits, 32, invariant=True),
            mesh=mesh,
            in_specs=spec,
            out_specs=P(),
        )
    )
    got = np.asarray(gather(jax.device_put(w, NamedSharding(mesh, spec))))
    shards = np.split(w, 8, axis=axis)
    if bits is None:
        expected = w
    else:
        expected = np.concatenate(
            [np.asarray(cq.round_trip(jnp.asarray(s.reshape(1, -1)), bits, 32)).reshape(s.shape)
             for s in shards],
            axis=axis,
        )  # fmt: skip
    np.testing.assert_array_equal(got, expected)


def test_group_all_to_all_routes_pieces_within_groups():
    mesh = _mesh(fsdp=8)
    # Device d sends piece k = 100 d + k to member k of its group.
    pieces = np.array([[100 * d + k for k in range(4)] for d in range(8)], np.float32)
    for group_size, stride in ((4, 1), (2, 4), (4, 2)):

        def exchange(x, group_size=group_size, stride=stride):
            return cq.group_all_to_all(x[0, :group_size], ps.FSDP, 8, group_size, stride)[None]

        out = jax.jit(
            jax.shard_map(exchange, mesh=mesh, in_specs=P(ps.FSDP), out_specs=P(ps.FSDP))
        )(pieces)
        for d in range(8):
            position = (d // stride) % group_size
            members = [d - position * stride + k * stride for k in range(group_size)]
            expected = [100 * m + position for m in members]
            np.testing.assert_array_equal(np.asarray(out)[d], expected)


@pytest.mark.parametrize(
    "grads, per_host, hadamard",
    [("int8", 8, False), ("int8", 4, False), ("int4", 2, False), ("int8", 8, True)],
)
def test_quantized_reduce_scatter_is_within_the_bound(rng, grads, per_host, hadamard):
    mesh = _mesh(fsdp=8)
    comm = cq.CommQuant(grads=grads, block_size=64, hadamard=hadamard, fsdp_per_host=per_host)
    g = rng.standard_normal((8, 32, 24)).astype(np.float32)  # one full gradient per device
    reduce = jax.jit(
        jax.shard_map(
            lambda x: cq.quantized_reduce_scatter(x[0], 0, comm),
            mesh=mesh,
            in_specs=P(ps.FSDP),
            out_specs=P(ps.FSDP),
        )
    )
    got = np.asarray(reduce(g))
    exact = g.sum(0)
    qmax = 2 ** (comm.grad_bits - 1) - 1
    # Every piece a device sends is off by at most half its block's step; a block's
    # absmax is at most the sender's absmax (x sqrt(block) after a Hadamard rotation).
    growth = 64.0 if hadamard else 1.0  # |H e|_inf <= sqrt(B) |e|_inf, |H x|_inf <= sqrt(B) |x|_inf
    bound = growth * np.abs(g).max(axis=(1, 2)).sum() / qmax / 2
    hosts = 8 // per_host
    if 1 < per_host < 8:  # the level-2 pieces are host partial sums, quantized again
        partial = g.reshape(hosts, per_host, 32, 24).sum(1)
        bound += growth * np.abs(partial).max(axis=(1, 2)).sum() / qmax / 2
    error = np.abs(got - exact)
    assert 0 < error.max() <= bound, (error.max(), bound)
    assert error.mean() < (0.01 if grads == "int8" else 0.15) * np.abs(exact).mean()


# -- the per-layer FSDP matmul ------------------------------------------------------------


@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=2,tensor=2", "fsdp=4,sequence=2"])
def test_fsdp_matmul_gradients_match_the_unsharded_ones(rng, mesh_spec):
    """Column + row parallel layers composed with TP / SP: explicit fp32 collectives give
    the exact gradients; int8 (+hpZ, two-level) stays close."""
    mesh = ps.make_mesh(**ps.parse_mesh_spec(mesh_spec))
    x = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((64, 96)) * 0.1, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((96, 64)) * 0.1, jnp.float32)

    def loss(x, w1, w2, comm=None):
        if comm is None:
            return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2))
        h = ps.column_parallel(x, ps.FsdpWeight(w1, None, comm))
        return jnp.sum(jnp.tanh(ps.row_parallel(jnp.tanh(h), ps.FsdpWeight(w2, None, comm))))

    expected = jax.grad(loss, argnums=(0, 1, 2))(x, w1, w2)
    fsdp = mesh.shape[ps.FSDP]
    for comm, tolerance in (
        (cq.CommQuant(explicit=True), 1e-5),
        (cq.CommQuant("int8", "int8", block_size=64, hpz=True, fsdp_per_host=fsdp // 2), 0.03),
    ):
        with jax.set_mesh(mesh):
            args = (
                jax.device_put(x, ps.named_sharding(mesh, ("batch", "length", None))),
                jax.device_put(w1, NamedSharding(mesh, P(ps.FSDP, ps.TENSOR))),
                jax.device_put(w2, NamedSharding(mesh, P(ps.TENSOR, ps.FSDP))),
            )
            got = jax.jit(jax.grad(lambda *a, c=comm: loss(*a, comm=c), argnums=(0, 1, 2)))(*args)
        for g, e in zip(got, expected, strict=True):
            error = np.abs(np.asarray(g) - np.asarray(e)).max() / np.abs(np.asarray(e)).max()
            assert error < tolerance, (comm, error)


def test_hlo_bytes_match_the_formula_and_shrink_4x_and_7x(rng):
    """Bytes counted from the compiled fwd + bwd of one fsdp layer (8 devices)."""
    mesh = _mesh(fsdp=8)
    x = jax.device_put(
        jnp.asarray(rng.standard_normal((8, 4, 256)), jnp.float32),
        ps.named_sharding(mesh, ("batch", "length", None)),
    )
    w = jax.device_put(
        jnp.asarray(rng.standard_normal((256, 128)), jnp.float32),
        NamedSharding(mesh, P(ps.FSDP, ps.TENSOR)),
    )
    counted = {}
    for name, comm in (
        ("fp32", cq.CommQuant(explicit=True)),
        ("int8", cq.CommQuant("int8", "int8")),
        ("int4", cq.CommQuant("int4", "int4")),
    ):
        comm = comm.resolve(mesh)

        def loss(x, w, comm=comm):
            return jnp.sin(ps.column_parallel(x, ps.FsdpWeight(w, None, comm))).sum()

        # d/dx keeps the backward gather alive (a first layer would not need it).
        with jax.set_mesh(mesh):
            hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
        counted[name] = collective_bytes(hlo, 8)["total"]
        formula = cq.step_bytes(w.size, 8, comm)["total"]
        assert counted[name] == pytest.approx(formula, rel=0.01), (name, counted[name], formula)
    assert counted["fp32"] / counted["int8"] > 3.8
    assert counted["fp32"] / counted["int4"] > 7.0


# -- training -----------------------------------------------------------------------------


def _four_devices():
    return ps.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])


INT8 = dict(comm_quant_weights="int8", comm_quant_grads="int8")
INT4_DIFF = dict(
    comm_quant_weights="int4", comm_quant_grads="int4", comm_weight_diff=True, comm_hadamard=True
)


def test_quantized_training_tracks_full_precision_and_resumes_exactly(tmp_path):
    """data=2 x fsdp=2: int8, and int4 weight differences with Hadamard-rotated int4
    gradients, follow the unquantized losses; a run resumed from step 2 (references
    restored from the checkpoint) repeats the uninterrupted one."""
    _, none = fit(small_config(), mesh=_four_devices())
    _, int8 = fit(small_config(**INT8), mesh=_four_devices())
    np.testing.assert_allclose(int8, none, rtol=0.01)
    assert not np.array_equal(int8, none)  # the wire really was quantized
    config = small_config(**INT4_DIFF, checkpoint_every=2)
    trainer, int4 = fit(config, mesh=_four_devices(), output_dir=tmp_path)
    trainer.close()
    np.testing.assert_allclose(int4, none, rtol=0.02)

    # The references follow the master weights to within a fraction of their change.
    _, references = trainer.opt_state
    fresh = Transformer(config.model, rngs=nnx.Rngs(config.seed))  # the same init
    initial = {name: layer.kernel.get_value() for name, layer in trainer._fsdp_layers(fresh)}
    assert len(references) == 2 * 7 + 1  # every dense projection and the head
    for name, layer in trainer._fsdp_layers(trainer.model):
        master = np.asarray(layer.kernel.get_value())
        drift = np.abs(np.asarray(references[name]) - master).max()
        assert 0 < drift < 0.2 * np.abs(master - np.asarray(initial[name])).max(), (name, drift)

    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed after step 2's checkpoint
    resumed = Trainer(
        config, mesh=_four_devices(), output_dir=tmp_path, progress=False, log=lambda *_: None
    )
    assert resumed.step == 2
    tail = [r["loss"] for r in resumed.fit() if "loss" in r]
    resumed.close()
    np.testing.assert_allclose(tail, int4[2:], rtol=1e-6)
    # The references are optimizer state: resuming without them is named, not an Orbax error.
    with pytest.raises(ValueError, match=r"saved with comm_weight_diff=True.*--comm-weight-diff"):
        Trainer(
            small_config(**INT8, checkpoint_every=2),
            mesh=_four_devices(),
            output_dir=tmp_path,
            progress=False,
            log=lambda *_: None,
        )


def test_gradient_accumulation_with_quantized_communication():
    """2 micro-batches of 4 sequences == one batch of 8, with int8 communication."""
    _, whole = fit(small_config(**INT8, steps=2), mesh=_four_devices())
    _, accumulated = fit(small_config(**INT8, steps=2, grad_accum=2), mesh=_four_devices())
    np.testing.assert_allclose(accumulated, whole, rtol=2e-3)


def test_two_process_run_matches_one_process(tmp_path):
    """fsdp=4 over 2 processes x 2 devices: hosts found from the process layout (hpZ and
    two-level qgZ); the same numbers as one process with fsdp_per_host=2."""
    flags = [
        "--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--steps", "3",
        "--set", "log_every=1", "--set", "eval_every=0", "--set", "checkpoint_every=0",
        "--no-progress", "--mesh", "data=1,fsdp=4", "--comm-quant", "int8", "--hpz",
        *[a for k, v in SMALL_MODEL.items() for a in ("--set", f"model.{k}={v}")],
    ]  # fmt: skip

    def env(devices):
        return dict(
            __import__("os").environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        )

    def losses(path):
        import json

        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    command = [sys.executable, "-m", "pallax", "train", *flags]
    one = subprocess.run(
        [*command, "--set", "comm_fsdp_per_host=2", "--out", str(tmp_path / "one")],
        cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [
        subprocess.Popen(
            [
                *command,
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
            env=env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    two = losses(tmp_path / "two")
    assert len(two) == 3
    np.testing.assert_allclose(two, losses(tmp_path / "one"), rtol=1e-5)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(comm_quant_weights="int3"), "weights='int3' must be one of"),
        (dict(comm_hadamard=True), "hadamard=True rotates quantized gradients"),
        (dict(comm_hpz=True, comm_weight_diff=True), "hpz and weight_diff exclude each other"),
        (dict(comm_quant_block=100, comm_hadamard=True, comm_quant_grads="int8"), "power-of-two"),
        (dict(comm_hpz="yes"), "hpz must be true or false"),
    ],
)
def test_bad_comm_settings_are_rejected_clearly(changes, message):
    with pytest.raises(ValueError, match="comm_\\* settings") as error:
        small_config(**changes)
    assert message in str(error.value)


def test_comm_quant_needs_an_fsdp_axis_and_hosts_that_divide_it():
    with pytest.raises(ValueError, match="needs fsdp > 1"):
        Trainer(small_config(mesh="data=8", comm_quant_weights="int8"), progress=False)
    with pytest.raises(ValueError, match="fsdp_per_host=3 does not divide the fsdp axis"):
        Trainer(small_config(comm_quant_grads="int8", comm_fsdp_per_host=3), progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--comm-quant", "int3"], "--comm-quant 'int3': expected MODE or WEIGHTS,GRADS"),
        (["--comm-quant", "int8,int8,int8"], "expected MODE or WEIGHTS,GRADS"),
        (["--comm-quant", "int8", "--mesh", "data=8"], "needs fsdp > 1"),
    ],
)
def test_cli_rejects_bad_comm_flags(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--steps", "1", "--no-progress", "--out", "/nonexistent/x", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sparse_and_quantized_layers_keep_their_own_gathers():
    """MLPs sparse, attention outputs W8: only the dense projections (q, k, v, head)
    take the quantized collectives; the model trains like without them."""
    config = small_config(steps=2, model=dict(SMALL_MODEL, embed_dim=256, mlp_dim=512))
    base = Transformer(config.model, rngs=nnx.Rngs(0))
    sparsify_model(base, 0.7, layers=lambda path, _: ".mlp." in path)
    quantize_model(base, 8, layers=lambda path, _: path.endswith("o_proj"))
    _, plain = fit(config, model=nnx.clone(base), mesh=_four_devices())
    trainer, quantized = fit(config.replace(**INT8), model=nnx.clone(base), mesh=_four_devices())
    assert sorted(trainer._fsdp_specs) == sorted(
        [f"blocks.{i}.attention.{p}_proj" for i in range(2) for p in "qkv"] + ["lm_head"]
    )
    np.testing.assert_allclose(quantized, plain, rtol=0.01)
