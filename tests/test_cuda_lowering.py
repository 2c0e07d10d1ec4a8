"""Every configuration the library dispatches to must lower for CUDA (Mosaic GPU) on CPU.

Catches unsupported ops, bad tile shapes and shared-memory overflow without a GPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from pallax import testing
from pallax.pallas_kernels import decode_attention, dot_product_attention

WINDOWS = [(True, None), (True, 4096), (True, 1024), (False, (64, 64)), (False, None)]


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
    # head_dim 256 differentiates the XLA reference (documented): one kernel, else three.
    assert exported.mlir_module().count("mosaic_gpu") >= (1 if head_dim == 256 else 3)


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
    # head_dim 256 differentiates the XLA reference (documented): one kernel, else three.
    assert module.count("mosaic_gpu") >= (1 if head_dim == 256 else 3)


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
