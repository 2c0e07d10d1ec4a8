"""Every configuration the library dispatches to must lower for CUDA (Mosaic GPU) on CPU.

Catches unsupported ops, bad tile shapes and shared-memory overflow without a GPU.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallax import testing
from pallax.pallas_kernels import decode_attention, dot_product_attention

WINDOWS = [(True, None), (True, 4096), (True, 1024), (False, (64, 64)), (False, None)]


def mosaic_kernels(module_text: str) -> int:
    """Mosaic GPU kernel launches in a lowered module (the name also appears elsewhere)."""
    return len(re.findall(r"custom_call @mosaic_gpu", module_text))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("is_causal, window", WINDOWS)
def test_attention_forward_and_backward_lower(head_dim, dtype, is_causal, window):
    q = jax.ShapeDtypeStruct((2, 1000, 8, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
    attend = functools.partial(
        dot_product_attention,
        is_causal=is_causal,
        local_window_size=window,
        implementation="mosaic",
    )

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    exported = testing.lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("is_causal, window, cap", [(True, None, None), (False, (64, 64), 50.0)])
def test_attention_smem_operand_path_lowers(head_dim, is_causal, window, cap):
    """The SMEM-staged P / dS path (``p_operand="smem"``, what interpret mode runs) still
    lowers for CUDA at the dispatch's tiles; the default (register operands) is lowered by
    the tests above."""
    import dataclasses as dc

    from pallax.pallas_kernels import AttentionConfig

    q = jax.ShapeDtypeStruct((1, 1000, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, head_dim), jnp.bfloat16)
    config = dc.replace(AttentionConfig.for_head_dim(head_dim), p_operand="smem")
    attend = functools.partial(
        dot_product_attention,
        is_causal=is_causal,
        local_window_size=window,
        logits_soft_cap=cap,
        implementation="mosaic",
        config=config,
    )

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    exported = testing.lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    # Forward + dK/dV with dQ fused at head_dim <= 128; forward, dQ and dK/dV at
    # head_dim 256 (no XLA backward).
    assert mosaic_kernels(exported.mlir_module()) == (2 if head_dim <= 128 else 3)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("p_operand", ["registers", "smem"])
def test_fused_dq_backward_lowers_within_shared_memory(head_dim, p_operand):
    """The dK/dV kernel with dQ fused (TMA add-reductions, dS^T read transposed as
    wgmma's A operand) lowers at the dispatch's tiles for both operand placements, two
    kernels in all, and its shared memory is what ``dkv_smem_bytes`` predicts (<= 227 KiB)."""
    import dataclasses as dc

    from benchmarks import gpu_proof
    from pallax.pallas_kernels import AttentionConfig
    from pallax.pallas_kernels import attention_mgpu as am

    q = jax.ShapeDtypeStruct((1, 1000, 4, head_dim), jnp.float16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, head_dim), jnp.float16)
    config = dc.replace(
        AttentionConfig.for_head_dim(head_dim), p_operand=p_operand, dq_mode="fused"
    )
    attend = functools.partial(
        dot_product_attention,
        is_causal=True,
        local_window_size=256,
        implementation="mosaic",
        config=config,
    )

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    uninstall = gpu_proof.install_smem_hook()
    before = len(gpu_proof._LOWERED)
    try:
        testing.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    finally:
        uninstall()
    forward, backward = gpu_proof._LOWERED[before:]
    expected = am.dkv_smem_bytes(config, head_dim, jnp.float16, p_operand, fuse_dq=True)
    assert backward["smem_dynamic"] == expected <= am.SMEM_BYTES
    # One CTA per 128 keys (1000 padded to 1024) per kv head: (batch, kv tiles, kv heads).
    assert backward["grid"] == [1, 8, 2]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_new, window, rolling", [(1, None, False), (4, 512, True)])
def test_decode_lowers(head_dim, num_new, window, rolling):
    q = jax.ShapeDtypeStruct((4, num_new, 32, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 2048, 8, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    run = functools.partial(
        decode_attention, local_window_size=window, rolling=rolling, implementation="mosaic"
    )
    exported = testing.lower_for_cuda(run, q, cache, cache, lengths)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("window", [None, 4096])
def test_soft_capped_attention_lowers(head_dim, window):
    """Gemma 2 (head_dim 256, window 4096, cap 50) and head_dim-64/128 variants:
    forward, dQ and dK/dV kernels with the tanh soft cap inside."""
    q = jax.ShapeDtypeStruct((1, 1000, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 4, head_dim), jnp.bfloat16)
    attend = functools.partial(
        dot_product_attention,
        is_causal=True,
        local_window_size=window,
        logits_soft_cap=50.0,
        implementation="mosaic",
    )

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    exported = testing.lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    module = exported.mlir_module()
    # Forward + dK/dV with dQ fused at head_dim <= 128; forward, dQ and dK/dV at
    # head_dim 256 (no XLA backward).
    assert mosaic_kernels(module) == (2 if head_dim <= 128 else 3)


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("window, rolling", [(None, False), (4096, True)])
def test_soft_capped_decode_lowers(head_dim, window, rolling):
    q = jax.ShapeDtypeStruct((4, 1, 8, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 4096, 4, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    run = functools.partial(
        decode_attention,
        local_window_size=None if window is None else window - 1,
        rolling=rolling,
        logits_soft_cap=50.0,
        implementation="mosaic",
    )
    exported = testing.lower_for_cuda(run, q, cache, cache, lengths)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize(
    "method, window", [("ulysses", None), ("ulysses", 512), ("halo", 256), ("ring", 256)]
)
def test_sharded_attention_with_kernels_lowers(method, window):
    """Kernels inside shard_map (vma typing, custom_vjp) lower for a 2x4 H100 mesh."""
    from jax.sharding import NamedSharding

    from pallax import sharding as ps
    from pallax.sharding import parallel

    mesh = testing.h100_abstract_mesh({"data": 1, "fsdp": 1, "sequence": 4, "tensor": 2})
    x = jax.ShapeDtypeStruct(
        (2, 2048, 8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, parallel.HEADS)
    )
    attend = functools.partial(
        ps.attention,
        mesh=mesh,
        is_causal=True,
        local_window_size=window,
        sequence_method=method,
        implementation="mosaic",
    )
    grad = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    exported = testing.lower_for_cuda(grad, x, x, x, mesh=mesh)
    # Ring attention merges blocks in XLA; the others run the Pallas kernels.
    assert ("mosaic_gpu" in exported.mlir_module()) == (method != "ring")


@pytest.mark.parametrize(
    "m, variant",
    [
        (1, None),
        (16, None),
        (64, None),
        (4096, None),
        (1, "legacy"),
        (16, "legacy"),
        (4096, "legacy"),
    ],
)
@pytest.mark.parametrize(
    "bits, act_bits, symmetric, group_size",
    [
        (8, None, True, 128),
        (4, None, True, 128),
        (4, None, False, 128),
        (8, 8, True, 128),
        (8, 8, True, None),  # per-channel W8A8: int32 over the whole K
    ],
)
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336)])
def test_quantized_matmul_lowers(m, variant, bits, act_bits, symmetric, group_size, k, n):
    """Every kernel (None: what the dispatch picks: "swap" up to 64 tokens, then
    "int8" for W8A8 and "legacy" for weight-only)."""
    from pallax.pallas_kernels import QuantMatmulConfig, quantize, quantized_matmul

    qw = jax.eval_shape(
        functools.partial(quantize, bits=bits, group_size=group_size, symmetric=symmetric),
        jax.ShapeDtypeStruct((k, n), jnp.float32),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    run = functools.partial(
        quantized_matmul,
        act_bits=act_bits,
        implementation="mosaic",
        config=QuantMatmulConfig(variant=variant),
    )
    exported = testing.lower_for_cuda(run, x, qw)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize(
    "m, k, n, bits, act_bits, group_size",
    [
        (1, 4096, 4096, 4, None, 128),  # swap W4A16, 4 splits (scale slabs of 8 blocks)
        (16, 2048, 2048, 4, None, 128),  # swap, tma_add: 8 splits of 2 blocks, offset slabs
        (1, 1536, 1536, 4, None, 128),  # swap, 12 scale groups: streamed per K block
        (16, 14336, 4096, 4, None, 128),  # swap, 5 splits
        (16, 4096, 4096, 8, 8, None),  # swap W8A8 per-channel, 5 splits
        (256, 4096, 4096, 8, 8, 128),  # int8 (prefill W8A8), 3 splits
        (128, 4096, 4096, 4, None, 128),  # legacy (prefill weight-only), 5 splits
    ],
)
@pytest.mark.parametrize("reduction", ["tma_add", "partials"])
def test_split_k_reductions_lower_at_the_dispatched_configs(
    reduction, m, k, n, bits, act_bits, group_size
):
    """The default split-K reduces in the kernel (``cp.reduce.async.bulk.tensor``
    into the aliased fp32 accumulator, no XLA sum); "partials" is XLA's sum."""
    from pallax.pallas_kernels import QuantMatmulConfig, quantize, quantized_matmul

    qw = jax.eval_shape(
        functools.partial(quantize, bits=bits, group_size=group_size),
        jax.ShapeDtypeStruct((k, n), jnp.float32),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    config = QuantMatmulConfig(split_k_reduction=reduction)
    run = functools.partial(
        quantized_matmul, act_bits=act_bits, implementation="mosaic", config=config
    )
    text = testing.lower_for_cuda(run, x, qw).mlir_module()
    (call,) = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    in_kernel = reduction == "tma_add"
    assert ("cp.reduce.async.bulk.tensor" in call) == in_kernel
    assert ("output_operand_aliases" in call) == in_kernel
    result = call.strip().split(" = ")[0]  # XLA sums the partials, nothing else
    assert (f"stablehlo.reduce({result} " in text) != in_kernel


@pytest.mark.parametrize(
    "m, act_bits, result", [(1, None, "14336x8xbf16"), (16, 8, "14336x16xf32")]
)
def test_one_split_writes_the_output_directly(m, act_bits, result):
    """``k_splits=1`` (the GPU sweep tries it): no reduction of any kind; the
    weight-only swap kernel writes the activation dtype itself."""
    from pallax.pallas_kernels import QuantMatmulConfig, quantize, quantized_matmul

    qw = jax.eval_shape(
        functools.partial(quantize, bits=4 if act_bits is None else 8, group_size=128),
        jax.ShapeDtypeStruct((4096, 14336), jnp.float32),
    )
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    config = QuantMatmulConfig(k_splits=1)
    run = functools.partial(
        quantized_matmul, act_bits=act_bits, implementation="mosaic", config=config
    )
    text = testing.lower_for_cuda(run, x, qw).mlir_module()
    (call,) = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert call.rstrip().split("->")[-1].strip().startswith(f"tensor<{result}>")
    assert "cp.reduce" not in call and "output_operand_aliases" not in call


@pytest.mark.parametrize("preset", ["small", "1b"])
def test_preset_train_step_lowers_with_kernels(preset):
    """The whole train step of a preset (forward + backward through every layer,
    AdamW update) lowers for CUDA with the Mosaic attention kernels the model
    dispatches on a GPU; shapes only, so the 1b preset costs no memory here."""
    import optax
    from flax import nnx

    from pallax.models import Transformer
    from pallax.train import cross_entropy, preset_config

    config = preset_config(preset)
    model_config = dataclasses.replace(config.model, attention_implementation="mosaic")
    model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)
    tokens = jax.ShapeDtypeStruct((1, config.seq_len + 1), jnp.int32)

    def step(params, opt_state, tokens):
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    exported = testing.lower_for_cuda(step, params, opt_state, tokens)
    text = exported.mlir_module()
    # Forward, dQ and dK/dV kernels for every layer.
    assert text.count("mosaic_gpu") >= 3 * config.model.num_layers


def test_gemma_like_train_step_and_decode_lower_with_kernels():
    """A Gemma-2-like model (local/global layers, head_dim 128, soft caps, q/k norms,
    q/k/v biases): its train step and a decode step lower with the Mosaic kernels."""
    import optax
    from flax import nnx

    from benchmarks.generation import GEMMA_OPTIONS
    from pallax.models import Transformer, TransformerConfig
    from pallax.models.generate import _decode_step
    from pallax.train import cross_entropy

    config = TransformerConfig(
        vocab_size=1024,
        embed_dim=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=128,
        mlp_dim=1024,
        layer_windows=(256, None),
        qkv_bias=True,
        qk_norm=True,
        local_rope_theta=1e4,
        attention_implementation="mosaic",
        **{**GEMMA_OPTIONS, "query_pre_attn_scalar": 128.0},
    )
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)
    tokens = jax.ShapeDtypeStruct((1, 1025), jnp.int32)

    def step(params, opt_state, tokens):
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    text = testing.lower_for_cuda(step, params, opt_state, tokens).mlir_module()
    assert text.count("mosaic_gpu") >= 3 * config.num_layers

    # Decode: the local layer's ring cache of 256 slots, the global layer's flat 2048.
    caches = [
        tuple(jax.ShapeDtypeStruct((2, slots, 2, 128), jnp.bfloat16) for _ in range(2))
        for slots in (256, 2048)
    ]
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)

    def decode(params, caches, tokens, positions):
        return _decode_step(nnx.merge(graphdef, params), caches, tokens, positions)

    text = testing.lower_for_cuda(decode, params, caches, ids, ids).mlir_module()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("split", ["out", "in"])
@pytest.mark.parametrize("bits, act_bits", [(8, None), (4, None), (8, 8)])
def test_tensor_parallel_quantized_layers_with_the_kernel_lower(split, bits, act_bits):
    """Column / row-parallel quantized linears on a fsdp=2 x tensor=2 H100 mesh:
    the kernel on each shard, forward and dx (typed like x inside shard_map)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallax import sharding as ps
    from pallax.pallas_kernels import quantize

    mesh = testing.h100_abstract_mesh({"data": 1, "fsdp": 2, "sequence": 1, "tensor": 2})
    out_axis, in_axis = ("tensor", "fsdp") if split == "out" else ("fsdp", "tensor")
    qw = jax.eval_shape(
        functools.partial(quantize, bits=bits, group_size=128),
        jax.ShapeDtypeStruct((1024, 1536), jnp.float32),
    )
    qw = jax.tree.map(
        lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
        qw,
        qw.partition_specs(out_axis, in_axis),
    )
    x_spec = P() if split == "out" else P(None, None, "tensor")
    x = jax.ShapeDtypeStruct((2, 8, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, x_spec))
    layer = ps.column_parallel if split == "out" else ps.row_parallel

    def loss(x, qw):
        y = layer(x, qw, mesh=mesh, act_bits=act_bits, implementation="mosaic")
        return y.astype(jnp.float32).sum()

    exported = testing.lower_for_cuda(jax.value_and_grad(loss), x, qw, mesh=mesh)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("variant", ["dense", "sparse70", "sparse90", "w4", "w8a8"])
def test_generation_of_converted_models_lowers_with_the_kernels_a_gpu_picks(variant, monkeypatch):
    """Prefill + the decode loop of the `small` preset (head_dim 64), dispatched
    as on an H100: every op's implementation=None resolves to Mosaic."""
    from flax import nnx

    from pallax.models import Transformer, quantize_model, sparsify_model
    from pallax.models.generate import _generate
    from pallax.pallas_kernels import _dispatch, sparse
    from pallax.train import preset_config

    monkeypatch.setattr(_dispatch, "on_hopper", lambda: True)
    monkeypatch.setattr(sparse, "_mosaic_self_check", lambda: True)
    config = preset_config("small").model
    model = Transformer(config, rngs=nnx.Rngs(0))
    convert = {
        "dense": lambda m: m,
        "sparse70": lambda m: sparsify_model(m, 0.7),
        "sparse90": lambda m: sparsify_model(m, 0.9),
        "w4": lambda m: quantize_model(m, 4),
        "w8a8": lambda m: quantize_model(m, 8, act_bits=8),
    }[variant]
    graphdef, state = nnx.split(convert(model))

    def run(state, prompt, lengths):
        out, _ = _generate(
            nnx.merge(graphdef, state), prompt, lengths, jax.random.key(0), max_new_tokens=4,
            temperature=0.0, top_k=None, top_p=1.0, stop_tokens=(),
        )  # fmt: skip
        return out

    prompt = jax.ShapeDtypeStruct((2, 96), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    text = testing.lower_for_cuda(run, state, prompt, lengths).mlir_module()
    # Per layer: prefill and decode attention, and for converted models the
    # 7 linears in prefill (192 tokens) and in the decode step.
    per_layer = 2 if variant == "dense" else 2 + 2 * 7
    assert text.count("mosaic_gpu") >= per_layer * config.num_layers


def test_head_dim_256_backward_runs_the_head_dim_split_kernels():
    """Gemma 2's local layer (window 4096, cap 50, GQA 2:1) at head_dim 256: the
    backward is two Mosaic kernels of 2 compute + 1 memory warpgroups (not XLA's
    autodiff), one CTA per 64 queries (dQ) / 64 keys (dK/dV), within the SMEM
    that ``attention_backward_wide_mgpu.smem_bytes`` predicts. (The ``"smem"``
    operand path is lowered by ``test_attention_smem_operand_path_lowers``.)"""
    import dataclasses as dc

    from benchmarks import gpu_proof
    from pallax.pallas_kernels import AttentionConfig
    from pallax.pallas_kernels import attention_backward_wide_mgpu as wide

    seq, heads, kv_heads, dtype, p_operand = 1000, 8, 4, jnp.bfloat16, "registers"
    q = jax.ShapeDtypeStruct((2, seq, heads, 256), dtype)
    kv = jax.ShapeDtypeStruct((2, seq, kv_heads, 256), dtype)
    config = dc.replace(AttentionConfig.for_head_dim(256), p_operand=p_operand)
    attend = functools.partial(
        dot_product_attention,
        is_causal=True,
        local_window_size=4096,
        logits_soft_cap=50.0,
        implementation="mosaic",
        config=config,
    )
    uninstall = gpu_proof.install_smem_hook()
    start = len(gpu_proof._LOWERED)
    try:

        def backward(q, k, v):
            return jax.vjp(attend, q, k, v)[1](jnp.ones(q.shape, dtype))

        module = testing.lower_for_cuda(backward, q, kv, kv).mlir_module()
    finally:
        uninstall()
    # The forward is recomputed for its residuals: forward, dQ, dK/dV.
    assert mosaic_kernels(module) == 3
    _, dq, dkv = gpu_proof._LOWERED[start:]
    padded = -(-seq // config.q_multiple) * config.q_multiple
    # Mosaic lists the grid minor-first: (batch, tiles, heads).
    assert dq["grid"] == [2, padded // 64, heads] and dkv["grid"] == [2, padded // 64, kv_heads]
    assert dq["block"] == dkv["block"] == [3 * 128, 1, 1]
    predicted = wide.smem_bytes(config, dtype, p_operand)
    for lowered, kernel in ((dq, "dQ"), (dkv, "dK/dV")):
        # Barriers and alignment add a little; the limit is 227 KiB.
        assert 0 <= lowered["smem_dynamic"] - predicted[kernel] < 2048, kernel
        assert lowered["smem_dynamic"] <= wide.SMEM_LIMIT_BYTES
