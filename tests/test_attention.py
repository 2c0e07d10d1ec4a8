"""dot_product_attention against jax.nn.dot_product_attention (an independent reference)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv

from pallax import testing
from pallax.pallas_kernels import AttentionConfig, dot_product_attention
from pallax.pallas_kernels.attention import normalize_window
from pallax.pallas_kernels.attention_mgpu import Window, _block_range

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def visible_rows(q_len, kv_len, is_causal, window):
    """Rows that see at least one key (jax.nn averages V on the others; we give 0)."""
    left, right = normalize_window(is_causal, window, q_len, kv_len)
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    return ((j >= i - left) & (j <= i + right)).any(axis=1)


def loss_and_grads(impl, q, k, v, do, is_causal, window):
    def loss(q, k, v):
        if impl == "jax":
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=is_causal, local_window_size=window, implementation="xla"
            )
        else:
            out = dot_product_attention(
                q, k, v, is_causal=is_causal, local_window_size=window, implementation=impl
            )
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def assert_matches_jax(q, k, v, do, is_causal, window, impl):
    tol = TOLERANCE[q.dtype.type]
    rows = visible_rows(q.shape[1], k.shape[1], is_causal, window)
    if impl == "mosaic":
        with testing.gpu_interpret():
            out, grads = jax.jit(
                functools.partial(loss_and_grads, "mosaic", is_causal=is_causal, window=window)
            )(q, k, v, do)
    else:
        out, grads = loss_and_grads(impl, q, k, v, do, is_causal, window)
    # jax.nn spreads a fully masked row over all keys, which also feeds dK/dV;
    # ours gives such rows zero output and no gradient, so the reference gets
    # zero cotangent there.
    do_masked = do * rows[None, :, None, None].astype(do.dtype)
    ref_out, ref_grads = loss_and_grads("jax", q, k, v, do_masked, is_causal, window)
    as32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(as32(out)[:, rows], as32(ref_out)[:, rows], atol=tol, rtol=tol)
    assert np.all(as32(out)[:, ~rows] == 0), "fully masked rows must be zero"
    assert np.isfinite(as32(out)).all()
    for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
        scale = max(1.0, float(np.abs(as32(g_ref)).max()))
        np.testing.assert_allclose(
            as32(g), as32(g_ref), atol=2 * tol * scale, rtol=2 * tol, err_msg=f"d{name}"
        )


# (batch, q_len, kv_len, heads, kv_heads, head_dim, is_causal, window)
XLA_CASES = [
    (2, 37, 37, 4, 4, 64, True, None),
    (1, 64, 80, 4, 2, 64, False, (7, 3)),
    (2, 50, 50, 8, 1, 128, True, 16),
    (1, 33, 65, 6, 3, 64, False, 5),
    (1, 96, 96, 2, 2, 32, True, (0, 0)),
    (1, 40, 24, 4, 2, 64, False, (2, 2)),  # rows >= 27 see no key.
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", XLA_CASES)
def test_xla_matches_jax(case, dtype):
    b, t, s, h, kh, d, is_causal, window = case
    q, k, v, do = random_qkv(1, b, t, s, h, kh, d, dtype)
    assert_matches_jax(q, k, v, do, is_causal, window, "xla")


MOSAIC_CASES = [
    # Odd lengths (padding), GQA 2:1, a causal window narrower than a tile.
    (1, 200, 200, 4, 2, 64, True, (40, 0), jnp.bfloat16),
    # Two-sided window, q shorter than kv, kv not a tile multiple.
    (1, 130, 300, 2, 1, 64, False, (16, 8), jnp.float16),
    # Full attention, head_dim 128, MQA.
    (2, 70, 150, 2, 1, 128, False, None, jnp.bfloat16),
    # Full causal over several tiles: exercises the unmasked fast path.
    (1, 384, 384, 2, 2, 64, True, None, jnp.bfloat16),
    # Window with fully masked rows (q beyond kv + right).
    (1, 160, 64, 2, 2, 64, False, (3, 1), jnp.bfloat16),
    # head_dim 256 (the head-dim-split backward kernels): causal over several
    # tiles (masked and unmasked steps), GQA 2:1, q/kv padding.
    (1, 130, 130, 2, 1, 256, True, None, jnp.bfloat16),
]


@pytest.mark.parametrize("case", MOSAIC_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_mosaic_interpret_matches_jax(case):
    b, t, s, h, kh, d, is_causal, window, dtype = case
    q, k, v, do = random_qkv(2, b, t, s, h, kh, d, dtype)
    assert_matches_jax(q, k, v, do, is_causal, window, "mosaic")


def test_mosaic_forward_has_no_races():
    q, k, v, _ = random_qkv(3, 1, 256, 256, 2, 1, 64, jnp.bfloat16)
    f = functools.partial(
        dot_product_attention, is_causal=True, local_window_size=100, implementation="mosaic"
    )
    with testing.gpu_interpret(detect_races=True):
        jax.block_until_ready(jax.jit(f)(q, k, v))
    assert not testing.races_detected()


@pytest.mark.parametrize("dq_mode", ["fused", "separate"])
def test_mosaic_backward_has_no_races(dq_mode):
    """dQ and dK/dV issue their S / dP products in pairs; the rings stay race-free. Fused,
    each warpgroup's dQ staging tile is rewritten only after its last TMA add has read
    it, and the adds of both warpgroups and of every CTA into the same dQ rows are
    reductions, not races."""
    q, k, v, do = random_qkv(7, 1, 256, 256, 2, 1, 64, jnp.bfloat16)

    def loss(q, k, v):
        out = dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            local_window_size=100,
            implementation="mosaic",
            config=AttentionConfig(block_q_bwd=128, dq_mode=dq_mode),
        )
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    with testing.gpu_interpret(detect_races=True):
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert not testing.races_detected()


def test_default_implementation_on_cpu_is_xla():
    q, k, v, _ = random_qkv(4, 1, 16, 16, 2, 2, 64, jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(functools.partial(dot_product_attention, is_causal=True))(q, k, v))
    assert "mosaic" not in jaxpr and "pallas" not in jaxpr


def test_window_block_skipping_scales_with_window():
    """The kernels visit seq x window blocks: 32k tokens, window 4k -> >= 3x less than causal."""
    config = AttentionConfig()
    seq = 32 * 1024

    def total_blocks(left):
        window = Window(left=left, right=0, q_len=seq, kv_len=seq)
        rows = config.q_rows_per_cta
        starts = jnp.arange(0, seq, rows)
        lo, hi = jax.vmap(lambda s: _block_range(*window.key_range(s, rows), config.block_kv))(
            starts
        )
        return int((hi - lo).sum())

    full = total_blocks(2 * seq)
    windowed = total_blocks(4096)
    assert full == sum(-(-(s + 128) // 128) for s in range(0, seq, 128))
    assert full / windowed >= 3.5
    assert windowed <= (seq // 128) * (-(-(4096 + 128) // 128) + 1)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, kwargs, message",
    [
        ((1, 8, 2, 64), (1, 8, 2, 32), (1, 8, 2, 32), {}, "head_dim mismatch"),
        ((1, 8, 3, 64), (1, 8, 2, 64), (1, 8, 2, 64), {}, "must divide query heads"),
        ((8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64), {}, "rank 4"),
        ((1, 8, 2, 64), (1, 8, 2, 64), (1, 9, 2, 64), {}, "value shape"),
        ((2, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64), {}, "batch mismatch"),
        ((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64), {"local_window_size": -1}, "non-negative"),
        ((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64), {"local_window_size": (1, 2, 3)}, "pair"),
        ((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64), {"implementation": "cuda"}, "implementation"),
    ],
)
def test_bad_input_raises(q_shape, k_shape, v_shape, kwargs, message):
    q, k, v = (jnp.zeros(s, jnp.bfloat16) for s in (q_shape, k_shape, v_shape))
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, k, v, **kwargs)


def test_mosaic_rejects_unsupported_dtype_and_head_dim():
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="float32"):
        dot_product_attention(q, q, q, implementation="mosaic")
    q = jnp.zeros((1, 8, 2, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim 96"):
        dot_product_attention(q, q, q, implementation="mosaic")


def test_bad_config_raises():
    with pytest.raises(ValueError, match="block_kv=96"):
        AttentionConfig(block_kv=96)
    with pytest.raises(ValueError, match="max_concurrent_steps=1"):
        AttentionConfig(max_concurrent_steps=1)
    with pytest.raises(ValueError, match="p_operand='tmem'"):
        AttentionConfig(p_operand="tmem")
    with pytest.raises(ValueError, match="dq_mode='atomic'"):
        AttentionConfig(dq_mode="atomic")


def kernel_jaxpr(config, interpret=False):
    """Jaxpr (Pallas kernel bodies included) of the forward and backward, traced as for
    an H100 or, with ``interpret``, as for GPU interpret mode."""
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, is_causal=True, implementation="mosaic", config=config)
        return out.astype(jnp.float32).sum()

    trace = lambda: str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q))  # noqa: E731
    if interpret:
        with testing.gpu_interpret():
            return trace()
    with jax.sharding.use_abstract_mesh(testing.h100_abstract_mesh()):
        return trace()


def test_p_operand_registers_on_gpu_smem_in_interpret_mode():
    """On the GPU, P / dS / P^T / dS^T go to wgmma from registers, accumulated in place
    (``run_state``, one per loop phase of the forward, dQ and dK/dV) with no staging
    stores; interpret mode and ``p_operand="smem"`` stage them in SMEM instead.
    (Three kernels: ``dq_mode="separate"``; the fused dQ is tested below.)"""
    separate = AttentionConfig(dq_mode="separate")
    registers = kernel_jaxpr(separate)
    assert kernel_jaxpr(dataclasses.replace(separate, p_operand="registers")) == registers
    smem = kernel_jaxpr(dataclasses.replace(separate, p_operand="smem"))
    assert registers.count("run_state") == 3 * (1 + 1 + 1)
    assert smem.count("run_state") == 0
    # Staging fences: one per register-operand GEMM site (forward 3, dQ 3, dK/dV 6).
    assert smem.count("commit_smem") - registers.count("commit_smem") == 3 + 3 + 6
    assert kernel_jaxpr(separate, interpret=True).count("run_state") == 0


def test_fused_dq_is_two_kernels_with_tma_add_reductions():
    """``dq_mode="fused"`` (the default on an H100 and in pallax's interpret mode):
    forward + one backward kernel whose every loop phase sends dQ partials to GMEM
    with a TMA add; its dK/dV/dQ GEMMs from registers are one in-place group per
    phase, plus the run_state that carries the dQ accumulator ref."""
    for config in (AttentionConfig(), AttentionConfig(dq_mode="fused")):
        fused = kernel_jaxpr(config)
        assert fused.count("mpmd_map") == 2
        assert fused.count("reduction_op=add") == 3
        assert fused.count("run_state") == 3 + 3 + 1
    separate = kernel_jaxpr(AttentionConfig(dq_mode="separate"))
    assert separate.count("mpmd_map") == 3 and "reduction_op" not in separate
    smem = kernel_jaxpr(AttentionConfig(dq_mode="fused", p_operand="smem"))
    assert smem.count("reduction_op=add") == 3 and smem.count("run_state") == 1
    interpreted = kernel_jaxpr(AttentionConfig(), interpret=True)
    assert interpreted.count("reduction_op=add") == 3


def test_register_operands_are_refused_in_interpret_mode():
    q, k, v, _ = random_qkv(6, 1, 64, 64, 2, 2, 64, jnp.bfloat16)
    with testing.gpu_interpret():
        assert AttentionConfig().resolved_p_operand() == "smem"
        with pytest.raises(ValueError, match="p_operand='registers'.*interpret mode"):
            dot_product_attention(
                q, k, v, implementation="mosaic", config=AttentionConfig(p_operand="registers")
            )


def soft_capped_reference(q, k, v, *, scale, cap, left, right):
    """Independent fp32 attention with Gemma 2's soft cap (``cap=None``: none): einsum,
    tanh, mask, softmax."""
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * scale
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    i = jnp.arange(q.shape[1])[:, None]
    j = jnp.arange(k.shape[1])[None, :]
    visible = (j >= i - left) & (j <= i + right)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")


# (batch, q_len, kv_len, heads, kv_heads, head_dim, is_causal, window, dtype); logits
# have std ~4 (scale 0.5) against a cap of 3, so the cap changes most probabilities.
SOFT_CAP_CASES = [
    (1, 200, 200, 4, 2, 64, True, (40, 0), jnp.bfloat16),
    (1, 130, 150, 2, 1, 64, False, None, jnp.float16),
    # Gemma 2-like head_dim 256 (head-dim-split backward): two-sided window, MQA.
    (1, 96, 160, 2, 1, 256, False, (16, 8), jnp.float16),
]


@pytest.mark.parametrize("impl", ["xla", "mosaic"])
@pytest.mark.parametrize("case", SOFT_CAP_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_logits_soft_cap_matches_reference(case, impl):
    b, t, s, h, kh, d, is_causal, window, dtype = case
    if impl == "xla" and dtype == jnp.float16:
        pytest.skip("XLA:CPU has no f16 x f16 -> f32 dot")
    q, k, v, do = random_qkv(5, b, t, s, h, kh, d, dtype)
    scale, cap = 0.5, 3.0
    left, right = normalize_window(is_causal, window, t, s)

    def loss(attend, q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    ours = functools.partial(
        dot_product_attention,
        scale=scale,
        is_causal=is_causal,
        local_window_size=window,
        logits_soft_cap=cap,
        implementation=impl,
    )
    run = jax.jit(jax.value_and_grad(functools.partial(loss, ours), (0, 1, 2), has_aux=True))
    if impl == "mosaic":
        with testing.gpu_interpret():
            (_, out), grads = run(q, k, v)
    else:
        (_, out), grads = run(q, k, v)
    reference = functools.partial(
        soft_capped_reference, scale=scale, cap=cap, left=left, right=right
    )
    (_, ref_out), ref_grads = jax.value_and_grad(
        functools.partial(loss, reference), (0, 1, 2), has_aux=True
    )(q, k, v)
    as32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(as32(out), as32(ref_out), atol=tol, rtol=tol)
    for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
        g_scale = max(1.0, float(np.abs(as32(g_ref)).max()))
        np.testing.assert_allclose(
            as32(g), as32(g_ref), atol=2 * tol * g_scale, rtol=2 * tol, err_msg=f"d{name}"
        )
    # The cap matters at this scale: without it the output is far from the reference.
    as_f32 = (x.astype(jnp.float32) for x in (q, k, v))
    uncapped = functools.partial(ours, logits_soft_cap=None, implementation="xla")(*as_f32)
    assert np.abs(as32(uncapped) - as32(ref_out)).max() > 10 * tol


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), "50", True])
def test_bad_logits_soft_cap_raises(cap):
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        dot_product_attention(q, q, q, logits_soft_cap=cap)


def test_head_dim_256_backward_refuses_tiles_that_overflow_smem():
    """The head_dim-256 backward checks its SMEM before tracing (128-query tiles
    would need 258 KiB in dQ) and names the fields; the forward alone is unaffected."""
    q = jax.ShapeDtypeStruct((1, 128, 2, 256), jnp.bfloat16)
    config = AttentionConfig(block_kv=64, block_q_bwd=128)
    attend = functools.partial(dot_product_attention, implementation="mosaic", config=config)
    loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    with jax.sharding.use_abstract_mesh(testing.h100_abstract_mesh()):
        jax.eval_shape(attend, q, q, q)
        with pytest.raises(ValueError, match=r"block_q_bwd=128.*258 KiB of shared memory.*dQ"):
            jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)


def test_head_dim_256_backward_uses_register_operands_on_gpu():
    """At head_dim 256 the backward kernels take dS / P^T / dS^T to wgmma from registers
    on the GPU (one in-place ``run_state`` per loop phase of dQ and dK/dV, no staging
    fence) and stage them in SMEM with ``p_operand="smem"``, as at hd <= 128."""
    q = jax.ShapeDtypeStruct((1, 128, 2, 256), jnp.bfloat16)

    def backward_jaxpr(p_operand):
        config = dataclasses.replace(AttentionConfig.for_head_dim(256), p_operand=p_operand)
        attend = functools.partial(
            dot_product_attention, is_causal=True, implementation="mosaic", config=config
        )
        with jax.sharding.use_abstract_mesh(testing.h100_abstract_mesh()):
            return str(jax.make_jaxpr(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q))(q, q, q))

    registers, smem = backward_jaxpr("registers"), backward_jaxpr("smem")
    # Forward + dQ + dK/dV, three loop phases each.
    assert registers.count("run_state") == 3 * 3 and smem.count("run_state") == 0
    # Staging fences: forward 3 (P), dQ 3 (dS), dK/dV 6 (P^T and dS^T).
    assert smem.count("commit_smem") - registers.count("commit_smem") == 3 + 3 + 6


# (batch, q_len, kv_len, heads, kv_heads, head_dim, is_causal, window, dtype, cap)
DQ_MODE_CASES = [
    # Causal sliding window, GQA 2:1, head_dim 64 (128-query backward steps).
    (1, 200, 200, 4, 2, 64, True, (40, 0), jnp.bfloat16, None),
    # Two-sided window, soft cap, MQA, head_dim 128, fp16.
    (1, 130, 150, 2, 1, 128, False, (16, 8), jnp.float16, 3.0),
]


@pytest.mark.parametrize("case", DQ_MODE_CASES, ids=lambda c: "-".join(map(str, c[:8] + c[9:])))
def test_fused_and_separate_dq_match_the_reference(case):
    """dQ accumulated by TMA adds in the dK/dV kernel against the separate dQ kernel and
    an fp32 reference; dK/dV do not depend on the mode."""
    b, t, s, h, kh, d, is_causal, window, dtype, cap = case
    q, k, v, do = random_qkv(8, b, t, s, h, kh, d, dtype)
    scale = 0.5 if cap else None
    left, right = normalize_window(is_causal, window, t, s)

    def grads(config):
        def loss(q, k, v):
            out = dot_product_attention(
                q,
                k,
                v,
                scale=scale,
                is_causal=is_causal,
                local_window_size=window,
                logits_soft_cap=cap,
                implementation="mosaic",
                config=config,
            )
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    base = AttentionConfig.for_head_dim(d)
    with testing.gpu_interpret():
        fused = grads(dataclasses.replace(base, dq_mode="fused"))
        separate = grads(dataclasses.replace(base, dq_mode="separate"))
    reference = functools.partial(
        soft_capped_reference,
        scale=scale or 1 / np.sqrt(d),
        cap=cap,
        left=left,
        right=right,
    )
    ref_grads = jax.grad(
        lambda q, k, v: jnp.sum(reference(q, k, v) * do.astype(jnp.float32)), argnums=(0, 1, 2)
    )(q, k, v)
    as32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    tol = TOLERANCE[dtype]
    for mode, got in (("fused", fused), ("separate", separate)):
        for name, g, g_ref in zip("qkv", got, ref_grads, strict=True):
            g_scale = max(1.0, float(np.abs(as32(g_ref)).max()))
            np.testing.assert_allclose(
                as32(g),
                as32(g_ref),
                atol=2 * tol * g_scale,
                rtol=2 * tol,
                err_msg=f"{mode} d{name}",
            )
    # Same fp32 terms summed in another order: dQ agrees to about one 16-bit rounding.
    dq_scale = float(np.abs(as32(separate[0])).max())
    np.testing.assert_allclose(
        as32(fused[0]), as32(separate[0]), atol=tol * dq_scale / 4, rtol=tol / 2
    )
    for name, g_fused, g_separate in zip("kv", fused[1:], separate[1:], strict=True):
        np.testing.assert_array_equal(as32(g_fused), as32(g_separate), err_msg=f"d{name}")


def test_dq_mode_falls_back_where_fused_cannot_run(monkeypatch):
    """``dq_mode=None`` picks the separate kernel for head_dim > 128, for tiles whose
    fused kernel overflows shared memory, and in an interpret mode without TMA
    reductions (jax's own, when pallax.testing has not patched it), where it still
    computes the right gradients; ``dq_mode="fused"`` there is refused by name."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    bf16 = jnp.bfloat16
    assert AttentionConfig().resolved_dq_mode(64, bf16) == "fused"
    assert AttentionConfig().resolved_dq_mode(256, bf16) == "separate"
    big = AttentionConfig(block_kv_bwd=128)  # fused: ~290 KiB at head_dim 128
    assert big.resolved_dq_mode(64, bf16) == "fused"
    assert big.resolved_dq_mode(128, bf16) == "separate"
    with pytest.raises(ValueError, match="dq_mode='fused'.*290 KiB of shared memory"):
        dataclasses.replace(big, dq_mode="fused").resolved_dq_mode(128, bf16)
    assert AttentionConfig(dq_mode="separate").resolved_dq_mode(64, bf16) == "separate"

    assert testing.tma_reductions_simulated()
    monkeypatch.setattr(
        gpu_callbacks, "copy_smem_to_gmem", gpu_callbacks.copy_smem_to_gmem.__wrapped__
    )
    assert not testing.tma_reductions_simulated()
    q, k, v, do = random_qkv(9, 1, 64, 64, 2, 1, 64, bf16)
    with testing.gpu_interpret():
        assert AttentionConfig().resolved_dq_mode(64, bf16) == "separate"
        with pytest.raises(ValueError, match="dq_mode='fused'.*without simulated TMA"):
            AttentionConfig(dq_mode="fused").resolved_dq_mode(64, bf16)
        out, grads = jax.jit(
            functools.partial(loss_and_grads, "mosaic", is_causal=True, window=None)
        )(q, k, v, do)
    _, ref_grads = loss_and_grads("jax", q, k, v, do, True, None)
    for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=0.1, err_msg=name
        )


def test_vmapped_fused_backward_equals_a_loop():
    """vmap of the gradient (per-example gradients) through the fused backward: its
    dQ accumulator is a run_state ref, which has no batching rule, so the mapped
    axis is folded into the kernel's batch; keys are shared (unmapped)."""
    q, k, v, do = random_qkv(10, 2, 64, 64, 2, 1, 64, jnp.bfloat16)
    q2 = jnp.stack([q[0], q[1]])[:, None]  # [examples, batch 1, T, H, D]

    def grads(q, k, v):
        return jax.grad(
            lambda q, k, v: jnp.sum(
                dot_product_attention(q, k, v, is_causal=True, implementation="mosaic").astype(
                    jnp.float32
                )
            ),
            argnums=(0, 1),
        )(q, k, v)

    with testing.gpu_interpret():
        assert AttentionConfig().resolved_dq_mode(64, jnp.bfloat16) == "fused"
        vmapped = jax.jit(jax.vmap(grads, in_axes=(0, None, None)))(q2, k[:1], v[:1])
        looped = [jax.jit(grads)(q2[i], k[:1], v[:1]) for i in range(2)]
    for i in range(2):
        for got, want in zip(vmapped, looped[i], strict=True):
            np.testing.assert_allclose(
                np.asarray(got[i], np.float32), np.asarray(want, np.float32), atol=2e-2
            )
