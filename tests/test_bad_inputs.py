"""A sweep of bad and edge inputs across the public API and the CLI.

Every bad input must fail where it enters the library with a ValueError (or
FileNotFoundError) whose message names the offending argument, field, file or
value: not a TypeError/ZeroDivisionError from deep inside jax, orbax or
safetensors, and never a silent wrong answer. Nearly all cases fail before
anything compiles, so the table stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallax import sharding as ps
from pallax.__main__ import main as cli_main
from pallax.models import (
    RopeScaling,
    Transformer,
    TransformerConfig,
    from_hf,
    generate,
    quantize_model,
    sparsify_model,
    to_hf,
)
from pallax.pallas_kernels import (
    SparseWeight,
    decode_attention,
    dot_product_attention,
    fake_quantize,
    linear,
    lkd,
    quantize,
    quantize_activations,
    quantized_matmul,
    sparse_matmul,
    sparsify,
    split_sparse,
)
from pallax.train import Checkpointer, TrainConfig, load_config, load_model, load_tokenizer
from pallax.train.config import from_dict, to_dict
from pallax.train.data import load_tokens

TINY = TransformerConfig(
    vocab_size=64, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64
)


@pytest.fixture(scope="module")
def tiny_model():
    return Transformer(TINY, rngs=nnx.Rngs(0))


def qkv(batch=1, q_len=8, kv_len=8, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32):
    key = jax.random.key(0)
    q = jax.random.normal(key, (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(key, (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, k


Q, K, V = qkv()
W = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
QW = quantize(jnp.asarray(W))
SW = sparsify(W, 0.5)
X = jnp.ones((4, 128), jnp.float32)


def with_value(array, index, value):
    out = np.array(array)
    out[index] = value
    return out


# --------------------------------------------------------------------------------------
# The table: (id, thunk, expected exception, regex the message must contain).
# --------------------------------------------------------------------------------------

CASES: list[tuple[str, object, type, str]] = []


def case(name, thunk, match, exc=ValueError):
    CASES.append((name, thunk, exc, match))


# TransformerConfig: every field's bad values, named in the message.
BAD_MODEL_FIELDS = {
    "vocab_size": [0, -1, 2.5, "256", None, True],
    "embed_dim": [0, -8, 32.0, "32"],
    "num_layers": [0, -1, 1.5],
    "num_heads": [0, -2, 2.0],
    "num_kv_heads": [0, -1, 1.0, "1"],
    "head_dim": [0, 1, 15, -16, 16.0],
    "mlp_dim": [0, -64, 64.5],
    "rope_theta": [0.0, -1.0, float("nan"), float("inf"), "10000"],
    "norm_eps": [-1e-5, 0.0, float("nan"), "1e-5"],
    "sliding_window": [0, -4, 2.5, "64"],
    "layer_windows": [(0,), (2.5,), "64", (None, 4)],
    "tie_embeddings": ["yes", 1],
    "dtype": ["float64", "bf16", jnp.bfloat16, None],
    "attention_implementation": ["cuda", "pallas", 1],
    "sequence_method": ["magic", None, "Ring"],
    "remat": ["no", 0],
    "rope_scaling": [{"kind": "yarn"}, {"factor": -2.0}, {"bogus": 1}, "llama3"],
}
for field, values in BAD_MODEL_FIELDS.items():
    for i, value in enumerate(values):
        match = "rope scaling|rope_scaling" if field == "rope_scaling" else field
        if field == "head_dim" and value in (1, 15):
            match = "head_dim|head dimension"
        case(
            f"model-{field}-{i}",
            lambda f=field, v=value: dataclasses.replace(TINY, **{f: v}),
            match,
        )
case("model-odd-derived-head-dim", lambda: TransformerConfig(embed_dim=30, num_heads=2), "even")
case("model-heads-not-divisible", lambda: TransformerConfig(num_heads=4, num_kv_heads=3), "divide")
case("rope-nan-factor", lambda: RopeScaling("linear", factor=float("nan")), "factor")

# TrainConfig fields (what --set and config files reach).
BAD_TRAIN_FIELDS = {
    "steps": ["ten", 0, 1.5, None],
    "seq_len": [0, "256", 16.0],
    "batch_size": [0, -1, "16"],
    "grad_accum": [0, 3],
    "learning_rate": [0.0, -1.0, float("nan"), "3e-3"],
    "warmup_steps": [-1, 1.5],
    "min_lr_ratio": [1.5, -0.1],
    "weight_decay": [-0.1, "0.1"],
    "adam_b1": [1.0, -0.1],
    "adam_b2": [1.5],
    "clip_norm": [-1.0, float("inf")],
    "seed": [1.5, "0"],
    "validation_fraction": [0.0, 1.0],
    "eval_every": [-1],
    "keep_checkpoints": [-1, 2.0],
    "mesh": ["data=2,data=2", "pipeline=2", 4, "data=two"],
    "peak_tflops": [0.0, -5.0, "fast"],
    "data": [3],
    "tokenizer": [["a"]],
}
for field, values in BAD_TRAIN_FIELDS.items():
    for i, value in enumerate(values):
        match = "mesh" if field == "mesh" else field
        case(
            f"train-{field}-{i}",
            lambda f=field, v=value: TrainConfig(**{f: v}),
            match,
        )
case("train-unknown-field", lambda: from_dict({"stepz": 3}), "stepz")
case("train-unknown-model-field", lambda: from_dict({"model": {"layers": 3}}), "layers")
case("train-model-not-table", lambda: from_dict({"model": 3}), "model")
case("train-unknown-preset", lambda: from_dict({"preset": "huge"}), "preset")
case("train-preset-not-str", lambda: from_dict({"preset": 3}), "preset")

# dot_product_attention.
ATTENTION_BAD = [
    ("float-window", dict(local_window_size=2.5), "local_window_size"),
    ("str-window", dict(local_window_size="4"), "local_window_size"),
    ("negative-window", dict(local_window_size=-1), "non-negative"),
    ("triple-window", dict(local_window_size=(1, 2, 3)), "local_window_size"),
    ("float-pair-window", dict(local_window_size=(1.0, 2)), "local_window_size"),
    ("negative-right", dict(local_window_size=(3, -1)), "non-negative"),
    ("bool-window", dict(local_window_size=True), "local_window_size"),
    ("bad-implementation", dict(implementation="cuda"), "implementation"),
    ("str-causal", dict(is_causal="yes"), "is_causal"),
    ("nan-scale", dict(scale=float("nan")), "scale"),
    ("str-scale", dict(scale="0.1"), "scale"),
    ("bad-config", dict(config={"block_q": 64}), "config"),
    ("mosaic-fp32", dict(implementation="mosaic"), "mosaic"),
]
for name, kwargs, match in ATTENTION_BAD:
    case(f"attention-{name}", lambda kw=kwargs: dot_product_attention(Q, K, V, **kw), match)
ATTENTION_BAD_ARRAYS = [
    ("rank3-query", lambda: (Q[0], K, V), "rank 4"),
    ("list-query", lambda: (Q.tolist(), K, V), "query must be an array"),
    ("batch-mismatch", lambda: (jnp.concatenate([Q, Q]), K, V), "batch"),
    ("head-dim-mismatch", lambda: (Q[..., :8], K, V), "head_dim"),
    ("value-shape", lambda: (Q, K, V[:, :4]), "value shape"),
    ("kv-heads-3", lambda: qkv(heads=4, kv_heads=3), "divide"),
    ("mixed-dtypes", lambda: (Q, K.astype(jnp.bfloat16), V), "dtypes"),
    ("int-inputs", lambda: (Q.astype(jnp.int32),) * 3, "floating"),
    ("zero-head-dim", lambda: qkv(head_dim=0), "head_dim"),
]
for name, make, match in ATTENTION_BAD_ARRAYS:
    case(f"attention-{name}", lambda m=make: dot_product_attention(*m()), match)

# decode_attention: lengths contract and arguments.
DQ = jnp.ones((2, 1, 2, 16), jnp.float32)
DK = jnp.ones((2, 8, 1, 16), jnp.float32)
DECODE_BAD = [
    ("huge-length", dict(lengths=jnp.array([3, 2**31 - 1])), r"lengths\[1\]=2147483647"),
    ("negative-length", dict(lengths=jnp.array([3, -1])), r"lengths\[1\]=-1"),
    ("length-past-cache", dict(lengths=jnp.array([9, 3])), r"lengths\[0\]=9"),
    ("float-lengths", dict(lengths=jnp.array([1.0, 2.0])), "integer"),
    ("lengths-shape", dict(lengths=jnp.array([1, 2, 3])), "shape"),
    ("right-window", dict(local_window_size=(2, 1)), "right window"),
    ("float-window", dict(local_window_size=1.5), "local_window_size"),
    ("rolling-no-window", dict(rolling=True), "rolling"),
    ("rolling-too-small", dict(rolling=True, local_window_size=8), "rolling cache"),
    ("str-rolling", dict(rolling="yes", local_window_size=2), "rolling"),
    ("bad-config", dict(config=3), "config"),
    ("bad-implementation", dict(implementation="triton"), "implementation"),
]
for name, kwargs, match in DECODE_BAD:
    kwargs = {"lengths": jnp.array([3, 4]), **kwargs}
    case(
        f"decode-{name}",
        lambda kw=kwargs: decode_attention(DQ, DK, DK, kw.pop("lengths"), **kw),
        match,
    )
case(
    "decode-more-new-than-length",
    lambda: decode_attention(jnp.ones((1, 4, 2, 16)), DK[:1], DK[:1], jnp.array([2])),
    r"lengths\[0\]=2",
)

# quantize, quantized_matmul, quantize_activations, fake_quantize, lkd.
case("quantize-inf", lambda: quantize(jnp.asarray(with_value(W, (5, 7), np.inf))), r"\[5, 7\]")
case(
    "quantize-nan-int4",
    lambda: quantize(jnp.asarray(with_value(W, (0, 3), np.nan)), bits=4),
    "non-finite",
)
case(
    "quantize-nan-named",
    lambda: quantize(jnp.asarray(with_value(W, (1, 1), np.nan)), name="blocks.0.q"),
    "blocks.0.q",
)
QUANTIZE_BAD = [
    ("bits-3", dict(bits=3), "bits"),
    ("bits-float", dict(bits=8.0), "bits"),
    ("bits-str", dict(bits="8"), "bits"),
    ("group-0", dict(group_size=0), "group_size"),
    ("group-negative", dict(group_size=-128), "group_size"),
    ("group-float", dict(group_size=128.0), "group_size"),
    ("group-96", dict(group_size=96), "group_size"),
    ("symmetric-str", dict(symmetric="no"), "symmetric"),
]
for name, kwargs, match in QUANTIZE_BAD:
    case(f"quantize-{name}", lambda kw=kwargs: quantize(jnp.asarray(W), **kw), match)
case("quantize-1d", lambda: quantize(jnp.ones(8)), "2D")
case("quantize-int", lambda: quantize(jnp.ones((8, 8), jnp.int8)), "floating")
case("quantize-empty", lambda: quantize(jnp.ones((0, 8))), "non-empty")
case("quantize-list", lambda: quantize([[1.0, 2.0]]), "must be an array")
case("fake-quantize-bits", lambda: fake_quantize(jnp.asarray(W), bits=2), "bits")
case("qmatmul-width", lambda: quantized_matmul(jnp.ones((2, 64)), QW), "in_features")
case("qmatmul-int-x", lambda: quantized_matmul(jnp.ones((2, 128), jnp.int32), QW), "bf16")
case("qmatmul-act-bits", lambda: quantized_matmul(X, QW, act_bits=4), "act_bits")
case("qmatmul-dense-w", lambda: quantized_matmul(X, jnp.asarray(W)), "QuantizedWeight")
case("qmatmul-config", lambda: quantized_matmul(X, QW, config="fast"), "config")
case(
    "qmatmul-w4a8",
    lambda: quantized_matmul(X, quantize(jnp.asarray(W), bits=4), act_bits=8),
    "8-bit",
)
case("qact-bits", lambda: quantize_activations(X, bits=4), "bits")
case("lkd-negative-steps", lambda: lkd(jnp.asarray(W), X, steps=-1), "steps")
case("lkd-float-steps", lambda: lkd(jnp.asarray(W), X, steps=2.5), "steps")
case(
    "lkd-calibration-width", lambda: lkd(jnp.asarray(W), jnp.ones((4, 64)), steps=1), "in_features"
)
case("lkd-nan-calibration", lambda: lkd(jnp.asarray(W), X * jnp.nan, steps=1), "calibration")
case("lkd-lr", lambda: lkd(jnp.asarray(W), X, steps=1, learning_rate=-1.0), "learning_rate")

# sparsify, sparse_matmul, split_sparse, SparseWeight.
SPARSIFY_BAD = [
    ("string-sparsity", dict(sparsity="0.5"), "sparsity"),
    ("sparsity-1", dict(sparsity=1.0), "sparsity"),
    ("negative-sparsity", dict(sparsity=-0.1), "sparsity"),
    ("nan-sparsity", dict(sparsity=float("nan")), "sparsity"),
    ("bad-method", dict(method="random"), "method"),
    ("wanda-without-norms", dict(method="wanda"), "activation_norms"),
    ("wanda-norm-shape", dict(method="wanda", activation_norms=np.ones(3)), "activation_norms"),
    (
        "wanda-nan-norms",
        dict(method="wanda", activation_norms=np.full(128, np.nan)),
        "activation_norms",
    ),
    ("pattern-garbled", dict(pattern="two:four"), "pattern"),
    ("pattern-inverted", dict(pattern="4:2"), "pattern"),
    ("pattern-not-dividing", dict(pattern="2:3"), "2:3"),
]
for name, kwargs, match in SPARSIFY_BAD:
    case(f"sparsify-{name}", lambda kw=kwargs: sparsify(W, **kw), match)
case("sparsify-nan", lambda: sparsify(with_value(W, (2, 9), np.nan), 0.5), r"\[2, 9\]")
case("sparsify-1d", lambda: sparsify(np.ones(8)), "2D")
case("sparsify-int", lambda: sparsify(np.ones((8, 8), np.int32)), "floating")
case("sparsify-list", lambda: sparsify([[1.0]]), "must be an array")
case("spmm-width", lambda: sparse_matmul(jnp.ones((2, 64)), SW), "in_features")
case("spmm-int-x", lambda: sparse_matmul(jnp.ones((2, 128), jnp.int32), SW), "bf16")
case("spmm-dense-w", lambda: sparse_matmul(X, jnp.asarray(W)), "SparseWeight")
case("spmm-config", lambda: sparse_matmul(X, SW, config=3), "config")
case("spmm-impl", lambda: sparse_matmul(X, SW, implementation="cuda"), "implementation")
case("split-0-shards", lambda: split_sparse(SW, 0, "out"), "num_shards")
case("split-float-shards", lambda: split_sparse(SW, 2.0, "out"), "num_shards")
case("split-axis", lambda: split_sparse(SW, 2, "rows"), "split")
case("split-dense", lambda: split_sparse(W, 2, "in"), "SparseWeight")
case("sparse-from-dense-mask", lambda: SparseWeight.from_dense(W, mask=np.ones((2, 2))), "mask")
case("linear-shape", lambda: linear(jnp.ones((2, 64)), jnp.asarray(W)), "does not match")
case("linear-act-bits-dense", lambda: linear(X, jnp.asarray(W), act_bits=8), "act_bits")
case("linear-list-x", lambda: linear([[1.0]], jnp.asarray(W)), "x must be an array")

# Sharding.
case("mesh-no-devices", lambda: ps.make_mesh(devices=[]), "devices")
case("mesh-float-size", lambda: ps.make_mesh(data=2.5), "data")
case("mesh-str-size", lambda: ps.make_mesh(tensor="2"), "tensor")
case("mesh-zero", lambda: ps.make_mesh(data=0), "data=0")
case("mesh-two-inferred", lambda: ps.make_mesh(data=-1, fsdp=-1), "-1")
case("mesh-wrong-product", lambda: ps.make_mesh(data=3, fsdp=1), "multiply")
case("mesh-not-divisible", lambda: ps.make_mesh(data=-1, tensor=3), "infer")
case("mesh-device-twice", lambda: ps.make_mesh(devices=[jax.devices()[0]] * 2), "more than once")
case("mesh-not-devices", lambda: ps.make_mesh(devices=[0, 1]), "jax devices")
case("mesh-devices-str", lambda: ps.make_mesh(devices="cpu"), "devices")
case("mesh-axis-types", lambda: ps.make_mesh(axis_types="manual"), "axis_types")
case("mesh-spec-twice", lambda: ps.parse_mesh_spec("data=2,data=4"), "twice")
case("mesh-spec-name", lambda: ps.parse_mesh_spec("pipe=2"), "pipe")
case("mesh-spec-value", lambda: ps.parse_mesh_spec("data=x"), "data=x")
case("mesh-spec-type", lambda: ps.parse_mesh_spec(["data=2"]), "mesh spec")


def enter_rules(rules):
    with ps.axis_rules(rules):
        pass


case("rules-bad-axis", lambda: enter_rules({"embed": "pipeline"}), "pipeline")
case("rules-int-axis", lambda: enter_rules({"embed": 3}), "embed")
case("rules-not-pairs", lambda: enter_rules(["embed"]), "pair")
case("rules-triples", lambda: enter_rules([("embed", "fsdp", "x")]), "pair")
case("rules-name-not-str", lambda: enter_rules([(1, "fsdp")]), "pair")
case("spec-string-names", lambda: ps.logical_to_spec("embed"), "tuple of logical axis names")
case("spec-unknown-name", lambda: ps.logical_to_spec(("embedding",)), "embedding")
case(
    "layout-heads",
    lambda: ps.validate_layout(ps.make_mesh(data=2, tensor=4), num_heads=6, num_kv_heads=2),
    "num_heads",
)
case(
    "layout-method",
    lambda: ps.validate_layout(ps.make_mesh(), num_heads=2, num_kv_heads=2, sequence_method="x"),
    "sequence_method",
)


def in_mesh(fn, **sizes):
    with jax.set_mesh(ps.make_mesh(**sizes)):
        return fn()


case("column-no-mesh", lambda: ps.column_parallel(jnp.ones((2, 4, 8)), jnp.ones((8, 8))), "mesh")
case(
    "column-width",
    lambda: in_mesh(lambda: ps.column_parallel(jnp.ones((8, 4, 8)), jnp.ones((16, 8))), data=8),
    "does not match",
)
case(
    "column-out-not-divisible",
    lambda: in_mesh(
        lambda: ps.column_parallel(jnp.ones((4, 4, 8)), jnp.ones((8, 6))), data=2, tensor=4
    ),
    "out_features=6",
)
case(
    "column-batch-not-divisible",
    lambda: in_mesh(lambda: ps.column_parallel(jnp.ones((3, 4, 8)), jnp.ones((8, 8))), data=8),
    "batch",
)
case(
    "column-rank2-x",
    lambda: in_mesh(lambda: ps.column_parallel(jnp.ones((8, 8)), jnp.ones((8, 8))), data=8),
    r"\[batch, length, in\]",
)
case(
    "row-in-not-divisible",
    lambda: in_mesh(
        lambda: ps.row_parallel(jnp.ones((4, 4, 6)), jnp.ones((6, 8))), data=2, tensor=4
    ),
    "in_features=6",
)
case(
    "sharded-attention-method",
    lambda: in_mesh(lambda: ps.attention(*qkv(batch=8), sequence_method="magic"), data=8),
    "sequence_method",
)
case(
    "sharded-attention-rank",
    lambda: in_mesh(lambda: ps.attention(Q[0], K[0], V[0]), data=8),
    "rank 4",
)
case(
    "sharded-attention-float-window",
    lambda: in_mesh(lambda: ps.attention(*qkv(batch=8), local_window_size=1.5), data=8),
    "local_window_size",
)
case(
    "distributed-no-coordinator",
    lambda: ps.initialize_distributed(None, 2, 0),
    "coordinator",
)
case("distributed-process-id", lambda: ps.initialize_distributed("h:1", 2, 5), "process_id")
case("distributed-float", lambda: ps.initialize_distributed("h:1", 2.0, 0), "num_processes")


def distributed_env(monkeypatch_env):
    import os

    old = os.environ.get("PALLAX_NUM_PROCESSES")
    os.environ["PALLAX_NUM_PROCESSES"] = monkeypatch_env
    try:
        ps.initialize_distributed()
    finally:
        if old is None:
            del os.environ["PALLAX_NUM_PROCESSES"]
        else:
            os.environ["PALLAX_NUM_PROCESSES"] = old


case("distributed-env", lambda: distributed_env("two"), "PALLAX_NUM_PROCESSES")

# Models: forward, generate, conversion.
MODEL = Transformer(TINY, rngs=nnx.Rngs(0))
PROMPT = [[1, 2, 3]]
GENERATE_BAD = [
    ("id-too-large", dict(prompt_tokens=[[1, 64]]), r"prompt_tokens\[0, 1\]=64"),
    ("negative-id", dict(prompt_tokens=[[-1, 2]]), r"prompt_tokens\[0, 0\]=-1"),
    ("float-ids", dict(prompt_tokens=np.array([[1.7, 2.2]])), "integers"),
    ("float-list-ids", dict(prompt_tokens=[[1.5, 2.0]]), "integers"),
    ("empty-prompt", dict(prompt_tokens=[[]]), "empty"),
    ("empty-batch", dict(prompt_tokens=np.zeros((0, 3), np.int32)), "batch > 0"),
    ("rank1-prompt", dict(prompt_tokens=np.array([1, 2, 3])), "prompt_tokens"),
    ("ragged-array", dict(prompt_tokens=[[1, 2], 3]), "prompt_tokens"),
    ("max-new-0", dict(max_new_tokens=0), "max_new_tokens"),
    ("max-new-float", dict(max_new_tokens=4.0), "max_new_tokens"),
    ("max-new-str", dict(max_new_tokens="4"), "max_new_tokens"),
    ("nan-temperature", dict(temperature=float("nan")), "temperature"),
    ("inf-temperature", dict(temperature=float("inf")), "temperature"),
    ("negative-temperature", dict(temperature=-0.5), "temperature"),
    ("top-k-0", dict(top_k=0), "top_k"),
    ("top-k-past-vocab", dict(top_k=65), "top_k"),
    ("top-k-float", dict(top_k=5.5), "top_k"),
    ("top-p-0", dict(top_p=0.0), "top_p"),
    ("top-p-large", dict(top_p=1.5), "top_p"),
    ("top-p-nan", dict(top_p=float("nan")), "top_p"),
    ("seed-float", dict(seed=0.5), "seed"),
    ("stop-past-vocab", dict(stop_tokens=(64,)), "stop_tokens"),
    ("stop-str", dict(stop_tokens="a"), "stop_tokens"),
    ("stop-int", dict(stop_tokens=3), "stop_tokens"),
    ("lengths-ignored-for-lists", dict(prompt_lengths=[2]), "contradicts"),
    (
        "lengths-too-long",
        dict(prompt_tokens=np.ones((1, 3), np.int32), prompt_lengths=[4]),
        "prompt_lengths",
    ),
    (
        "lengths-zero",
        dict(prompt_tokens=np.ones((1, 3), np.int32), prompt_lengths=[0]),
        "prompt_lengths",
    ),
    (
        "lengths-float",
        dict(prompt_tokens=np.ones((1, 3), np.int32), prompt_lengths=[2.5]),
        "prompt_lengths",
    ),
]
for name, kwargs, match in GENERATE_BAD:
    kwargs = {"prompt_tokens": PROMPT, "max_new_tokens": 2, **kwargs}
    case(f"generate-{name}", lambda kw=kwargs: generate(MODEL, **kw), match)
case("forward-float-tokens", lambda: MODEL(jnp.ones((1, 4))), "integer")
case("forward-rank1", lambda: MODEL(jnp.ones((4,), jnp.int32)), r"\[batch, seq\]")
case("sparsify-model-sparsity", lambda: sparsify_model(MODEL, "0.5"), "sparsity")
case("sparsify-model-method", lambda: sparsify_model(MODEL, 0.5, "random"), "method")
case("sparsify-model-wanda-no-data", lambda: sparsify_model(MODEL, 0.5, "wanda"), "calibration")
case(
    "sparsify-model-wanda-float-data",
    lambda: sparsify_model(MODEL, 0.5, "wanda", calibration=np.ones((1, 4))),
    "calibration",
)
case(
    "sparsify-model-wanda-id-range",
    lambda: sparsify_model(MODEL, 0.5, "wanda", calibration=np.full((1, 4), 99)),
    "vocab_size",
)
case("quantize-model-group-0", lambda: quantize_model(MODEL, 4, group_size=0), "group_size")
case("quantize-model-bits", lambda: quantize_model(MODEL, 3), "bits")
case("quantize-model-method", lambda: quantize_model(MODEL, 8, method="gptq"), "method")
case("quantize-model-w4a8", lambda: quantize_model(MODEL, 4, act_bits=8), "bits=8")
case("quantize-model-lkd-no-data", lambda: quantize_model(MODEL, 8, method="lkd"), "calibration")


def nan_model_quantize():
    model = Transformer(TINY, rngs=nnx.Rngs(1))
    w = model.blocks[0].mlp.up_proj.kernel
    w.set_value(w.get_value().at[3, 4].set(jnp.inf))
    quantize_model(model, 8)


case("transformer-config-type", lambda: Transformer({"vocab_size": 8}, rngs=nnx.Rngs(0)), "config")
case("generate-model-type", lambda: generate(TINY, PROMPT, 2), "Transformer")
case(
    "shard-model-mesh-type",
    lambda: __import__("pallax").models.shard_model(MODEL, "data=2"),
    "mesh",
)


def trainer(**kwargs):
    from pallax.train import Trainer

    config = TrainConfig(model=dataclasses.replace(TINY, vocab_size=256), seq_len=16)
    return Trainer(kwargs.pop("config", config), progress=False, **kwargs)


case("trainer-config-type", lambda: trainer(config={"steps": 3}), "TrainConfig")
case("trainer-float-tokens", lambda: trainer(tokens=np.ones(10000) * 1.5), "integer")
case("trainer-token-range", lambda: trainer(tokens=np.full(10000, 300)), "vocab_size")
case("quantize-model-inf-named", nan_model_quantize, r"blocks\.0\.mlp\.up_proj.*\[3, 4\]")


@pytest.mark.parametrize(("name", "thunk", "exc", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_by_name(name, thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_sweep_is_large_enough():
    assert len(CASES) + len(FILE_CASES) + len(CLI_CASES) >= 200


# --------------------------------------------------------------------------------------
# Files: config.json, safetensors, config files, checkpoints, tokenizers, data.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return to_hf(MODEL, tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A run directory holding one checkpoint of a tiny byte-level model."""
    run = tmp_path_factory.mktemp("run")
    config = TrainConfig(model=dataclasses.replace(TINY, vocab_size=256), seq_len=16)
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    checkpointer = Checkpointer(run / "checkpoints")
    meta = {"config": to_dict(config), "weights": {}}
    checkpointer.save(3, nnx.state(model, nnx.Param), None, meta, force=True)
    checkpointer.wait()
    checkpointer.close()
    return run


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def garble_hf_config(d):
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_')


def drop_hf_key(d):
    values = json.loads((d / "config.json").read_text())
    del values["hidden_size"]
    (d / "config.json").write_text(json.dumps(values))


def truncate(file: Path, keep: int):
    file.write_bytes(file.read_bytes()[:keep])


def garble_safetensors(d):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")


def truncate_safetensors(d):
    truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2)


def latin1_hf_config(d):
    (d / "config.json").write_bytes(b'{"architectures": ["Llama\xe9"]}')


def bad_index(d):
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "missing.safetensors"}}')


FILE_CASES = [
    ("hf-missing-dir", lambda d: Path(d) / "nope", "not found", FileNotFoundError),
    ("hf-garbled-config", garble_hf_config, "config.json.*not valid JSON", ValueError),
    ("hf-missing-key", drop_hf_key, "hidden_size", ValueError),
    ("hf-not-utf8", latin1_hf_config, "config.json.*UTF-8", ValueError),
    ("hf-garbled-safetensors", garble_safetensors, "model.safetensors", ValueError),
    ("hf-truncated-safetensors", truncate_safetensors, "model.safetensors", ValueError),
    ("hf-index-missing-file", bad_index, "missing.safetensors", FileNotFoundError),
]


@pytest.mark.parametrize(
    ("name", "damage", "match", "exc"), FILE_CASES, ids=[c[0] for c in FILE_CASES]
)
def test_damaged_hf_checkpoint_is_named(name, damage, match, exc, hf_dir, tmp_path):
    d = copy_of(hf_dir, tmp_path)
    target = damage(d) or d
    with pytest.raises(exc, match=match):
        from_hf(target, dtype="float32")


def test_from_hf_check_finite_names_the_tensor(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_of(hf_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][2, 5] = np.nan
    save_file(tensors, d / "model.safetensors")
    from_hf(d, dtype="float32")  # off by default: no extra pass over the weights
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight.*non-finite"):
        from_hf(d, dtype="float32", check_finite=True)


def test_config_files(tmp_path):
    latin1 = tmp_path / "run.toml"
    latin1.write_bytes(b"steps = 3\n# caf\xe9\n")
    with pytest.raises(ValueError, match="run.toml.*UTF-8"):
        load_config(latin1)
    garbled = tmp_path / "run.json"
    garbled.write_text('{"steps": 3,')
    with pytest.raises(ValueError, match="run.json"):
        load_config(garbled)
    wrong_type = tmp_path / "types.toml"
    wrong_type.write_text('steps = "ten"\n')
    with pytest.raises(ValueError, match="types.toml.*steps"):
        load_config(wrong_type)
    bad_model = tmp_path / "model.toml"
    bad_model.write_text("[model]\nnum_kv_heads = 0\n")
    with pytest.raises(ValueError, match="model.toml.*num_kv_heads"):
        load_config(bad_model)
    with pytest.raises(FileNotFoundError, match="absent.toml"):
        load_config(tmp_path / "absent.toml")
    assert load_config(
        _write(tmp_path / "ok.toml", "steps = 3\n[model]\nnum_layers = 1\nlayer_windows = [4]\n")
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tokenizer_and_data_files(tmp_path):
    with pytest.raises(ValueError, match="tok.json"):
        load_tokenizer(str(_write(tmp_path / "tok.json", "{garbage")))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_tokenizer(str(tmp_path / "absent.json"))
    tokenizer = load_tokenizer(None)
    with pytest.raises(ValueError, match="bad.npy"):
        load_tokens(str(_write(tmp_path / "bad.npy", "not numpy")), tokenizer)
    latin1 = tmp_path / "text.txt"
    latin1.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="text.txt.*UTF-8"):
        load_tokens(str(latin1), tokenizer)
    np.save(tmp_path / "ids.npy", np.array([1, 300]))
    with pytest.raises(ValueError, match="ids.npy"):
        load_tokens(str(tmp_path / "ids.npy"), tokenizer)


def test_load_model_never_creates_a_directory(tmp_path):
    missing = tmp_path / "no" / "checkpoints"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(missing)
    assert not (tmp_path / "no").exists()


def damage_meta(d):
    (d / "checkpoints" / "3" / "meta" / "metadata").write_text('{"config": {"seq_')


def drop_meta_config(d):
    meta = d / "checkpoints" / "3" / "meta" / "metadata"
    values = json.loads(meta.read_text())
    del values["config"]
    meta.write_text(json.dumps(values))


def bad_meta_value(d):
    meta = d / "checkpoints" / "3" / "meta" / "metadata"
    values = json.loads(meta.read_text())
    values["config"]["model"]["num_kv_heads"] = 0
    meta.write_text(json.dumps(values))


def truncate_params(d):
    for file in (d / "checkpoints" / "3" / "params").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            truncate(file, 10)


def drop_param_metadata(d):
    (d / "checkpoints" / "3" / "params" / "_METADATA").write_text("{")


CHECKPOINT_CASES = [
    ("garbled-meta", damage_meta, "3"),
    ("meta-without-config", drop_meta_config, "config"),
    ("meta-bad-field", bad_meta_value, "num_kv_heads"),
    ("truncated-params", truncate_params, "params|parameters"),
    ("garbled-param-metadata", drop_param_metadata, "params|parameters"),
]


@pytest.mark.parametrize(
    ("name", "damage", "match"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_damaged_checkpoint_is_named(name, damage, match, checkpoint_dir, tmp_path):
    d = copy_of(checkpoint_dir, tmp_path)
    damage(d)
    with pytest.raises(ValueError, match=match) as info:
        load_model(d / "checkpoints")
    assert str(d) in str(info.value)


def test_load_model_missing_step(checkpoint_dir):
    with pytest.raises(FileNotFoundError, match="step 7"):
        load_model(checkpoint_dir / "checkpoints", 7)
    with pytest.raises(ValueError, match="step"):
        load_model(checkpoint_dir / "checkpoints", -2)


# --------------------------------------------------------------------------------------
# The CLI: every user error exits 2 with one line naming the flag/file/field.
# --------------------------------------------------------------------------------------

CLI_CASES = [
    ("demo-steps-0", ["demo", "--steps", "0", "--out", "{tmp}/demo"], "steps"),
    ("demo-preset", ["demo", "--preset", "huge", "--out", "{tmp}/demo"], "preset"),
    ("set-steps-word", ["train", "--set", "steps=ten"], "steps"),
    ("set-unknown", ["train", "--set", "stepz=3"], "stepz"),
    ("set-model-kv-0", ["train", "--set", "model.num_kv_heads=0"], "num_kv_heads"),
    ("set-model-eps", ["train", "--set", "model.norm_eps=-1"], "norm_eps"),
    ("set-model-dtype", ["train", "--set", "model.dtype=float64"], "dtype"),
    ("set-model-impl", ["train", "--set", "model.attention_implementation=cuda"], "attention"),
    ("set-model-method", ["train", "--set", "model.sequence_method=magic"], "sequence_method"),
    ("set-window-float", ["train", "--set", "model.sliding_window=2.5"], "sliding_window"),
    ("steps-0", ["train", "--steps", "0"], "steps"),
    ("mesh-twice", ["train", "--mesh", "data=2,data=4"], "twice"),
    ("mesh-product", ["train", "--mesh", "data=3"], "multiply"),
    ("lr-negative", ["train", "--lr", "-1"], "learning_rate"),
    ("missing-config", ["train", "--config", "{tmp}/absent.toml"], "absent.toml"),
    ("config-suffix", ["train", "--config", "{tmp}/run.yaml"], "run.yaml"),
    ("config-latin1", ["train", "--config", "{tmp}/latin1.toml"], "latin1.toml"),
    ("config-garbled", ["train", "--config", "{tmp}/garbled.json"], "garbled.json"),
    ("data-missing", ["train", "--data", "{tmp}/absent.txt"], "absent.txt"),
    ("tokenizer-garbled", ["train", "--tokenizer", "{tmp}/garbled.json"], "garbled.json"),
    ("init-from-missing", ["train", "--init-from", "{tmp}/absent-run"], "absent-run"),
    ("generate-missing", ["generate", "--checkpoint", "{tmp}/absent", "--prompt", "a"], "absent"),
    ("generate-new-0", ["generate", "{ck}", "--max-new-tokens", "0"], "max_new_tokens"),
    ("generate-nan-temp", ["generate", "{ck}", "--temperature", "nan"], "temperature"),
    ("generate-top-k-0", ["generate", "{ck}", "--top-k", "0"], "top_k"),
    ("generate-top-k-vocab", ["generate", "{ck}", "--top-k", "1000"], "top_k"),
    ("generate-top-p", ["generate", "{ck}", "--top-p", "1.5"], "top_p"),
    ("generate-step", ["generate", "{ck}", "--step", "7"], "step 7"),
    ("generate-empty-prompt", ["generate", "--checkpoint", "{ckdir}", "--prompt", ""], "prompt"),
    ("convert-nothing", ["convert", "--checkpoint", "{ckdir}", "--out", "{tmp}/o"], "nothing"),
    ("convert-group-0", ["convert", "{cv}", "--quantize", "w4", "--group-size", "0"], "group"),
    ("convert-sparsity", ["convert", "{cv}", "--sparsity", "1.5"], "sparsity"),
    ("convert-pattern", ["convert", "{cv}", "--sparsity", "0.5", "--pattern", "x:y"], "pattern"),
    ("convert-both", ["convert", "{cv}", "--sparsity", "0.5", "--quantize", "w8"], "one weight"),
    (
        "convert-missing",
        ["convert", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/o", "--quantize", "w8"],
        "nope",
    ),
    ("convert-calib", ["convert", "{cv}", "--quantize", "w8", "--calibration-batches", "0"], "cal"),
]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, checkpoint_dir):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "latin1.toml").write_bytes(b"steps = 3 # caf\xe9\n")
    (tmp / "garbled.json").write_text("{")
    (tmp / "run.yaml").write_text("steps: 3")
    return tmp


@pytest.mark.parametrize(("name", "argv", "match"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_user_error_exits_2_with_one_line(name, argv, match, cli_files, checkpoint_dir, capsys):
    ck = ["--checkpoint", str(checkpoint_dir), "--prompt", "a"]
    cv = ["--checkpoint", str(checkpoint_dir), "--out", str(cli_files / "out")]
    expanded = []
    for arg in argv:
        if arg == "{ck}":
            expanded += ck
        elif arg == "{cv}":
            expanded += cv
        else:
            expanded.append(arg.format(tmp=cli_files, ckdir=checkpoint_dir))
    if expanded[0] == "train" and "--out" not in expanded:
        expanded += ["--out", str(cli_files / "train-out"), "--no-progress"]
    with pytest.raises(SystemExit) as info:
        cli_main(expanded)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"pallax {expanded[0]}: error:"), err
    assert __import__("re").search(match, lines[0]), err
    assert not (cli_files / "absent").exists() and not (cli_files / "nope").exists()


# --------------------------------------------------------------------------------------
# Contracts that need data: decode lengths under jit, dtypes on CPU, the self-check deadline.
# --------------------------------------------------------------------------------------


def test_decode_lengths_under_jit_are_checked_with_checkify():
    from jax.experimental import checkify

    step = jax.jit(lambda lengths: decode_attention(DQ, DK, DK, lengths, debug_checks=True))
    for bad in ([-1, 3], [3, 9]):
        err, _ = checkify.checkify(step)(jnp.array(bad))
        assert "lengths must be 0 or in [1, 8]" in err.get()
    err, out = checkify.checkify(step)(jnp.array([1, 8]))
    assert err.get() is None and out.shape == DQ.shape
    # Without debug_checks jit stays check-free; a negative length sees no key: zeros.
    out = jax.jit(lambda n: decode_attention(DQ, DK, DK, n))(jnp.array([-1, 3]))
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(out[1]) != 0)
    # Length 0 is the documented empty row, eager and traced: zeros, no error.
    err, out = checkify.checkify(step)(jnp.array([0, 3]))
    assert err.get() is None and np.all(np.asarray(out[0]) == 0)
    assert np.all(np.asarray(decode_attention(DQ, DK, DK, jnp.array([0, 3]))[0]) == 0)


DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
DTYPE_TOL = {jnp.float16: 2e-2, jnp.bfloat16: 6e-2, jnp.float32: 1e-5}


def close(got, want, dtype):
    tol = DTYPE_TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_every_public_op_runs_in_each_dtype_on_cpu(dtype, jit):
    """fp16 crashed the XLA attention path on CPU (an F16_F16_F32 dot algorithm)."""
    run = jax.jit if jit else (lambda f, **_: f)
    q, k, v = (x.astype(dtype) for x in qkv(q_len=8, kv_len=8, heads=4, kv_heads=2))
    want = jax.nn.dot_product_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True, local_window_size=(3, 0)
    )
    got = run(lambda a, b, c: dot_product_attention(a, b, c, is_causal=True, local_window_size=3))(
        q, k, v
    )
    assert got.dtype == dtype
    close(got, want, dtype)

    lengths = jnp.array([8])
    got = run(lambda a, b, c: decode_attention(a, b, c, lengths))(q[:, -1:], k, v)
    assert got.dtype == dtype
    last = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q[:, -1:], k, v)))
    close(got, last, dtype)

    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 128)), dtype)
    dense = jnp.asarray(W)
    for weight, act_bits in ((quantize(dense), None), (quantize(dense, 4), None), (QW, 8)):
        got = run(lambda a, w=weight, b=act_bits: quantized_matmul(a, w, act_bits=b))(x)
        assert got.dtype == dtype
        want = np.asarray(x, np.float32) @ np.asarray(weight.dequantize())
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.1, atol=0.6)
    got = run(lambda a: sparse_matmul(a, SW))(x)
    assert got.dtype == dtype
    close(got / 8, np.asarray(x, np.float32) @ np.asarray(SW.todense()) / 8, dtype)
    got = run(lambda a: linear(a, dense))(x)
    close(got / 8, np.asarray(x, np.float32) @ W / 8, dtype)
    assert quantize(dense.astype(dtype)).dequantize().shape == W.shape
    assert sparsify(np.asarray(dense.astype(dtype)), 0.5).values.dtype == dtype
    assert run(lambda w: fake_quantize(w))(dense.astype(dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_model_forward_and_generate_in_each_dtype_on_cpu(dtype):
    config = dataclasses.replace(TINY, dtype=dtype)
    model = Transformer(config, rngs=nnx.Rngs(0))
    logits = model(jnp.array([[1, 2, 3, 4]]))
    assert np.isfinite(np.asarray(logits)).all()
    out = generate(model, [[1, 2, 3]], 3)
    assert out.shape == (1, 3) and int(out.max()) < config.vocab_size


def test_sparse_self_check_hang_falls_back_with_a_warning(monkeypatch):
    """A kernel that never returns must not hang the first sparse_matmul."""
    import threading

    from pallax.pallas_kernels import sparse

    release = threading.Event()
    monkeypatch.setattr(sparse, "_self_check_products", lambda: release.wait(60) and None)
    monkeypatch.setenv("PALLAX_SELF_CHECK_TIMEOUT", "0.2")
    sparse._mosaic_self_check.cache_clear()
    try:
        with pytest.warns(UserWarning, match="did not finish its self-check within 0.2 s"):
            assert sparse._mosaic_self_check() is False
        # Cached: later calls neither wait nor warn again.
        assert sparse._mosaic_self_check() is False
        # An exception inside the check is a reason too, not a crash.
        assert "raised RuntimeError" in sparse._with_deadline(
            lambda: (_ for _ in ()).throw(RuntimeError("boom")), 5.0
        )
        assert sparse._with_deadline(lambda: None, 5.0) is None
    finally:
        release.set()
        sparse._mosaic_self_check.cache_clear()


def test_automatic_dispatch_uses_the_deadline(monkeypatch):
    """On a (pretend) Hopper a hanging self-check sends sparse_matmul to XLA."""
    from pallax.pallas_kernels import _dispatch, sparse

    release = __import__("threading").Event()
    monkeypatch.setattr(_dispatch, "on_hopper", lambda: True)
    monkeypatch.setattr(sparse, "_self_check_products", lambda: release.wait(60) and None)
    monkeypatch.setenv("PALLAX_SELF_CHECK_TIMEOUT", "0.2")
    sparse._mosaic_self_check.cache_clear()
    try:
        x = jnp.ones((2, 128), jnp.bfloat16)
        with pytest.warns(UserWarning, match="using XLA"):
            got = sparse_matmul(x, SW)
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(sparse.sparse_matmul_reference(x, SW), np.float32),
        )
    finally:
        release.set()
        sparse._mosaic_self_check.cache_clear()
