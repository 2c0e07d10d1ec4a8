"""Sharded layouts on 8 fake CPU devices equal the unsharded computation."""

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_qkv
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sharded_step import inputs, loss_fn, reference

from pallax import sharding as ps
from pallax.pallas_kernels import dot_product_attention
from pallax.sharding import parallel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def assert_trees_close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_make_mesh_infers_and_validates():
    mesh = ps.make_mesh(data=-1, tensor=2, sequence=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2}
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    explicit = ps.make_mesh(fsdp=8, data=1, axis_types="explicit")
    assert all(t == jax.sharding.AxisType.Explicit for t in explicit.axis_types)
    with pytest.raises(ValueError, match="multiply to 12, but there are 8 devices"):
        ps.make_mesh(data=3, tensor=4)
    with pytest.raises(ValueError, match="not divisible by the other axes' product 3"):
        ps.make_mesh(data=-1, tensor=3)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        ps.make_mesh(data=-1, fsdp=-1)
    assert ps.parse_mesh_spec("data=2, tensor=4") == {"data": 2, "tensor": 4}
    with pytest.raises(ValueError, match="bad mesh entry 'pipeline=2'"):
        ps.parse_mesh_spec("pipeline=2")


def test_logical_rules_map_and_override():
    assert ps.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert ps.logical_to_spec(("batch", "length", "act_heads", None)) == P(
        ("data", "fsdp"), "sequence", "tensor", None
    )
    # A mesh axis is used at most once per array.
    assert ps.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    with ps.axis_rules({"embed": None, "vocab": ("tensor", "fsdp")}):
        assert ps.logical_to_spec(("vocab", "embed")) == P(("tensor", "fsdp"), None)
    assert ps.logical_to_spec(("embed",)) == P("fsdp")
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        with ps.axis_rules({"embed": "model"}):
            pass
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'experts'"):
        ps.logical_to_spec(("experts",))


def test_invalid_layouts_raise_at_configuration():
    mesh = ps.make_mesh(data=1, tensor=4, sequence=2)
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by the tensor axis"):
        ps.validate_layout(mesh, num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="Ulysses needs num_heads=12 divisible by tensor x seq"):
        ps.validate_layout(mesh, num_heads=12, num_kv_heads=4, sequence_method="ulysses")
    with pytest.raises(ValueError, match="seq_len=31 is not divisible by the sequence axis"):
        ps.validate_layout(mesh, num_heads=8, num_kv_heads=8, seq_len=31)


SP_CASES = [
    # (mesh, method, is_causal, window)
    (dict(data=2, tensor=4), "ulysses", True, None),  # TP only
    (dict(data=1, sequence=8), "ulysses", True, 6),
    (dict(data=2, tensor=2, sequence=2), "ulysses", False, (5, 3)),
    (dict(data=2, sequence=4), "ring", True, None),
    (dict(tensor=2, sequence=4), "ring", False, (5, 3)),
    (dict(data=2, tensor=2, sequence=2), "ring", True, 9),
    (dict(tensor=2, sequence=4), "halo", True, 16),
    (dict(data=2, tensor=2, sequence=2), "halo", True, 10),
    (dict(fsdp=2, sequence=4), "halo", False, (7, 0)),
]


@pytest.mark.parametrize("mesh_sizes, method, is_causal, window", SP_CASES)
def test_sharded_attention_matches_unsharded(mesh_sizes, method, is_causal, window):
    q, k, v, do = random_qkv(0, 4, 64, 64, 8, 8 if method == "ulysses" else 4, 16, jnp.float32)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * do)

    unsharded = functools.partial(
        dot_product_attention, is_causal=is_causal, local_window_size=window
    )
    ref = jax.value_and_grad(functools.partial(loss, unsharded), argnums=(0, 1, 2))(q, k, v)
    mesh = ps.make_mesh(**mesh_sizes)
    sharded = functools.partial(
        ps.attention, is_causal=is_causal, local_window_size=window, sequence_method=method
    )
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, parallel.HEADS)
        args = jax.device_put((q, k, v), spec)
        got = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), argnums=(0, 1, 2)))(
            *args
        )
    assert_trees_close(got, ref, tol=5e-5)


@pytest.mark.parametrize(
    "mesh_sizes, method, window",
    [
        (dict(data=2, tensor=2, sequence=2), "ulysses", 6),
        (dict(data=2, tensor=2, sequence=2), "ring", None),
        (dict(tensor=2, sequence=4), "halo", 10),
    ],
)
def test_soft_capped_sharded_attention_matches_unsharded(mesh_sizes, method, window):
    """Gemma 2's logit soft cap through every sequence method (ring merges in XLA)."""
    q, k, v, do = random_qkv(1, 4, 64, 64, 8, 8 if method == "ulysses" else 4, 16, jnp.float32)
    q = q * 4  # logits of std ~4 against a cap of 2: the cap changes the result
    options = dict(is_causal=True, local_window_size=window, logits_soft_cap=2.0)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v, **options) * do)

    ref = jax.value_and_grad(functools.partial(loss, dot_product_attention), (0, 1, 2))(q, k, v)
    mesh = ps.make_mesh(**mesh_sizes)
    sharded = functools.partial(ps.attention, sequence_method=method)
    with jax.set_mesh(mesh):
        args = jax.device_put((q, k, v), NamedSharding(mesh, parallel.HEADS))
        got = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), (0, 1, 2)))(*args)
    assert_trees_close(got, ref, tol=5e-5)
    uncapped = dot_product_attention(q, k, v, is_causal=True, local_window_size=window)
    capped = dot_product_attention(q, k, v, **options)
    assert np.abs(np.asarray(uncapped - capped)).max() > 0.1


def test_halo_rejects_windows_it_cannot_serve():
    q, k, v, _ = random_qkv(0, 2, 32, 32, 4, 4, 8, jnp.float32)
    with jax.set_mesh(ps.make_mesh(data=2, sequence=4)):
        with pytest.raises(ValueError, match="fit in one shard"):
            ps.attention(q, k, v, is_causal=True, local_window_size=12, sequence_method="halo")
        with pytest.raises(ValueError, match="causal sliding window"):
            ps.attention(q, k, v, local_window_size=(2, 2), sequence_method="halo")


@pytest.mark.parametrize(
    "mesh_sizes",
    [dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2)],
)
def test_dp_fsdp_tp_step_matches_unsharded_and_shards_state(mesh_sizes):
    ref_loss, ref_grads = reference()
    params, x, names = inputs()
    mesh = ps.make_mesh(**mesh_sizes)
    with jax.set_mesh(mesh):
        params = ps.shard_params(params, names, mesh)
        x = jax.device_put(x, ps.named_sharding(mesh, ("batch", "length", "act_embed")))
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, x)
        optimizer = optax.adamw(1e-3)
        state = ps.init_optimizer_state(optimizer, params)
        updates, state = jax.jit(optimizer.update)(grads, state, params)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    adam = state[0]
    for name, value in params.items():
        expected = ps.named_sharding(mesh, names[name])
        for array in (value, adam.mu[name], adam.nu[name]):
            assert array.sharding.is_equivalent_to(expected, array.ndim), (name, array.sharding)
            assert array.addressable_shards[0].data.nbytes == value.nbytes // shards


@pytest.mark.parametrize(
    "method, mesh_sizes",
    [
        ("ulysses", dict(data=2, fsdp=2, sequence=2)),  # 2 kv heads: no room for tensor too
        ("ring", dict(data=2, tensor=2, sequence=2)),
        ("halo", dict(fsdp=2, tensor=2, sequence=2)),
    ],
)
def test_sequence_parallel_step_matches_unsharded(method, mesh_sizes):
    ref_loss, ref_grads = reference()
    params, x, names = inputs()
    mesh = ps.make_mesh(**mesh_sizes)
    with jax.set_mesh(mesh):
        sharded = ps.shard_params(params, names, mesh)
        xs = jax.device_put(x, ps.named_sharding(mesh, ("batch", "length", "act_embed")))
        step = jax.jit(jax.value_and_grad(functools.partial(loss_fn, sequence_method=method)))
        loss, grads = step(sharded, xs)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    monkeypatch.delenv("PALLAX_NUM_PROCESSES", raising=False)
    assert ps.initialize_distributed() is False
    assert ps.initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="needs coordinator_address and process_id"):
        ps.initialize_distributed(num_processes=2)
    with pytest.raises(ValueError, match="process_id=5 must be in"):
        ps.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_single_process(tmp_path):
    worker = Path(__file__).with_name("multihost_worker.py")
    out = tmp_path / "result.json"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), coordinator, "2", str(i), str(out)],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    log_text = "\n".join((tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], log_text
    result = json.loads(out.read_text())
    ref_loss, ref_grads = reference()
    np.testing.assert_allclose(result["loss"], ref_loss, rtol=1e-5)
    assert_trees_close({k: np.array(v) for k, v in result["grads"].items()}, ref_grads)


def test_sequence_parallel_benchmark_bytes_match_formulas():
    from benchmarks import sequence_parallel

    results = sequence_parallel.main(
        ["--seq", "512", "--window", "32", "--heads", "8", "--head-dim", "16", "--iters", "1"]
    )
    itemsize, sp = 4, jax.device_count()
    expected = {
        "halo": parallel.halo_bytes(1, 512, 8, 16, itemsize, 32, sp),
        "ring": parallel.ring_bytes(1, 512, 8, 16, itemsize, 32, sp),
        "ulysses": parallel.ulysses_bytes(1, 512, 8, 8, 16, itemsize, sp),
    }
    assert {m: r[0] for m, r in results.items()} == expected
    # Halo moves only the window: 64 rows of K+V vs the ring's 7 shards.
    assert expected["halo"] * 10 < expected["ring"]


@pytest.mark.parametrize("act_bits", [None, 8])
def test_quantized_tp_fsdp_mlp_matches_unsharded(act_bits):
    from pallax.pallas_kernels import quantize, quantized_matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 16, 256)), jnp.float32)
    w_up = quantize(jnp.asarray(rng.standard_normal((256, 512)) * 0.05, jnp.float32), bits=4)
    w_down = quantize(jnp.asarray(rng.standard_normal((512, 200)) * 0.05, jnp.float32), bits=8)

    def mlp(x, up, down, column, row):
        return row(jnp.tanh(column(x, up)), down)

    def plain(x, w, **kw):
        return quantized_matmul(x, w, **kw)

    # Row-parallel W8A8 quantizes each token's activations per tensor shard, so
    # it is compared against the dequantized dense product with a tolerance.
    ref = mlp(x, w_up, w_down, plain, functools.partial(plain, act_bits=act_bits))
    dense = jnp.tanh(x @ w_up.dequantize()) @ w_down.dequantize()
    mesh = ps.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        place = lambda w, out_axis, in_axis: jax.device_put(  # noqa: E731
            w, jax.tree.map(lambda s: NamedSharding(mesh, s), w.partition_specs(out_axis, in_axis))
        )
        up, down = place(w_up, "tensor", "fsdp"), place(w_down, "fsdp", "tensor")
        xs = jax.device_put(x, ps.named_sharding(mesh, ("batch", "length", "act_embed")))
        row = functools.partial(ps.row_parallel, act_bits=act_bits)
        got = jax.jit(lambda x, u, d: mlp(x, u, d, ps.column_parallel, row))(xs, up, down)
        assert up.values.addressable_shards[0].data.nbytes == up.values.nbytes // 4
        # Frozen quantized weights still pass gradients to their inputs (e.g.
        # to train norms): dx is summed over the tensor shards.
        dx = jax.jit(jax.grad(lambda x: jnp.sum(mlp(x, up, down, ps.column_parallel, row) ** 2)))(
            xs
        )
    assert got.shape == (8, 16, 200)
    if act_bits is None:
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)
    scale = float(jnp.abs(dense).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=0.02 * scale)
    ref_dx = jax.grad(
        lambda x: jnp.sum(
            mlp(x, w_up, w_down, plain, functools.partial(plain, act_bits=act_bits)) ** 2
        )
    )(x)
    dx_scale = float(jnp.abs(ref_dx).max())
    tolerance = 1e-5 if act_bits is None else 0.05  # W8A8: per-shard token scales
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), atol=tolerance * dx_scale)


def test_sparse_tp_mlp_matches_unsharded_and_trains_values_only():
    from pallax.pallas_kernels import sparse_matmul, sparsify, split_sparse

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 16, 200)), jnp.float32)
    up = sparsify(rng.standard_normal((200, 300)).astype(np.float32) * 0.1, 0.7)
    down = sparsify(rng.standard_normal((300, 120)).astype(np.float32) * 0.1, 0.5)
    ref = sparse_matmul(jnp.tanh(sparse_matmul(x, up)), down)
    mesh = ps.make_mesh(data=2, fsdp=2, tensor=2)
    up_shards, down_shards = split_sparse(up, 2, "out"), split_sparse(down, 2, "in")
    np.testing.assert_array_equal(np.asarray(up_shards.todense()), np.asarray(up.todense()))
    with jax.set_mesh(mesh):
        place = lambda w: jax.device_put(w, NamedSharding(mesh, P("tensor")))  # noqa: E731
        up_s, down_s = place(up_shards), place(down_shards)
        xs = jax.device_put(x, ps.named_sharding(mesh, ("batch", "length", "act_embed")))

        def loss(up_s, down_s, x):
            return jnp.sum(ps.row_parallel(jnp.tanh(ps.column_parallel(x, up_s)), down_s) ** 2)

        y = jax.jit(lambda u, d, x: ps.row_parallel(jnp.tanh(ps.column_parallel(x, u)), d))(
            up_s, down_s, xs
        )
        grads = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(up_s, down_s, xs)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)
    # Gradients land on the nonzero values only; the same loss unsharded agrees.
    ref_grad = jax.grad(
        lambda v: jnp.sum(sparse_matmul(jnp.tanh(sparse_matmul(x, up.with_values(v))), down) ** 2)
    )(up.values)
    stacked_grad = dataclasses.replace(up_shards.stacked, values=grads[0].stacked.values)
    sharded_grad_dense = dataclasses.replace(up_shards, stacked=stacked_grad).todense()
    np.testing.assert_allclose(
        np.asarray(sharded_grad_dense),
        np.asarray(up.with_values(ref_grad).todense()),
        rtol=1e-3,
        atol=1e-3,
    )
    with pytest.raises(ValueError, match="split along 'in'"):
        with jax.set_mesh(mesh):
            ps.column_parallel(xs, down_s)


def test_wrappers_work_on_explicit_axis_meshes():
    """jax's sharding-in-types mode (AxisType.Explicit) with jax.set_mesh."""
    q, k, v, do = random_qkv(3, 4, 64, 64, 8, 4, 16, jnp.float32)
    ref = dot_product_attention(q, k, v, is_causal=True, local_window_size=8)
    params, x, names = inputs()
    ref_loss, ref_grads = reference()
    mesh = ps.make_mesh(data=2, tensor=2, sequence=2, axis_types="explicit")
    with jax.set_mesh(mesh):
        args = jax.device_put((q, k, v), NamedSharding(mesh, parallel.HEADS))
        for method in ("ring", "halo"):
            out = jax.jit(
                functools.partial(
                    ps.attention, is_causal=True, local_window_size=8, sequence_method=method
                )
            )(*args)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
        sharded = ps.shard_params(params, names, mesh)
        xs = jax.device_put(x, ps.named_sharding(mesh, ("batch", "length", "act_embed")))
        step = jax.jit(jax.value_and_grad(functools.partial(loss_fn, sequence_method="ring")))
        loss, grads = step(sharded, xs)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    # Explicit mode carries shardings in types: the gradients keep the params' layout.
    assert grads["w_up"].sharding.spec == ps.logical_to_spec(names["w_up"])


def test_int4_shards_must_hold_whole_pack_blocks():
    """int4 packs two nibbles per byte in blocks of 128 inputs: a tensor shard of
    64 inputs would cut a block in half (the forward failed later with a reshape
    TypeError); shard_model names the layer instead."""
    from flax import nnx

    from pallax.models import Transformer, TransformerConfig, quantize_model
    from pallax.models.transformer import shard_model

    config = TransformerConfig(
        vocab_size=64, embed_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=256
    )
    model = quantize_model(Transformer(config, rngs=nnx.Rngs(0)), 4)
    mesh = ps.make_mesh(tensor=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"o_proj: .*int4 shards hold multiples of 128 inputs"):
        shard_model(model, mesh)
    # 8-bit codes are not packed: the same split works.
    model = quantize_model(Transformer(config, rngs=nnx.Rngs(0)), 8)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    expected = model(tokens)
    shard_model(model, mesh)
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(model(tokens), expected, atol=2e-2, rtol=2e-2)
