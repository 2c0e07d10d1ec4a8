"""Decoder-only transformer (Llama / Mistral / Qwen2.5 / Qwen3 / Gemma 2 / Gemma 3) in Flax NNX.

Token embedding, RoPE, RMSNorm, GQA attention with an optional sliding window
per layer, SwiGLU MLP, tied or untied output head. Family options (all off by
default, i.e. Llama): q/k/v bias (Qwen2.5), per-head q/k RMSNorm (Qwen3,
Gemma 3), Gemma's ``(1 + w)`` norms, sandwich norms around attention and MLP,
GeGLU, sqrt(embed_dim)-scaled embeddings, ``query_pre_attn_scalar``, attention
and final-logit soft-capping (Gemma 2), a separate RoPE base for local layers
(Gemma 3). Every projection is a
:class:`Linear` whose weight may be dense, a ``SparseWeight`` or a
``QuantizedWeight``; all of them go through :func:`pallax.pallas_kernels.linear`.
Parameters carry ``logical_axes`` metadata that :mod:`pallax.sharding` maps to a
mesh; under ``jax.set_mesh`` attention runs through ``pallax.sharding.attention``
(kernels on local shards).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallax import sharding as ps
from pallax._checks import check_bool, check_choice, check_float, check_int, check_optional_int
from pallax.pallas_kernels import (
    QuantizedWeight,
    SparseWeight,
    dot_product_attention,
    linear,
    split_sparse,
)
from pallax.pallas_kernels.quantization import PACK_BLOCK
from pallax.pallas_kernels.sparse import SparseShards

ROPE_SCALINGS = ("linear", "llama3")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
IMPLEMENTATIONS = (None, "mosaic", "xla")
SEQUENCE_METHODS = ("ulysses", "ring", "halo")
MLP_ACTIVATIONS = {  # gelu_tanh is HF's "gelu_pytorch_tanh" (Gemma's GeGLU)
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Long-context RoPE frequency scaling (Hugging Face ``rope_scaling``).

    ``kind="linear"``: every frequency divided by ``factor`` (position
    interpolation). ``kind="llama3"`` (Llama 3.1+): frequencies whose
    wavelength exceeds ``original_max_positions / low_freq_factor`` are divided
    by ``factor``, those shorter than ``original_max_positions /
    high_freq_factor`` are kept, and the band between blends the two linearly
    in ``original_max_positions / wavelength``.
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"rope scaling kind {self.kind!r} must be one of {ROPE_SCALINGS}")
        check_float("rope_scaling.factor", self.factor, minimum=0.0, open_min=True)
        check_float("rope_scaling.low_freq_factor", self.low_freq_factor)
        check_float("rope_scaling.high_freq_factor", self.high_freq_factor)
        check_int("rope_scaling.original_max_positions", self.original_max_positions)
        if self.kind == "llama3" and not (
            0 < self.low_freq_factor < self.high_freq_factor and self.original_max_positions > 0
        ):
            raise ValueError(
                "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and "
                f"original_max_positions > 0, got {self}"
            )

    def apply(self, freqs: jax.Array) -> jax.Array:
        if self.kind == "linear":
            return freqs / self.factor
        wavelength = 2 * jnp.pi / freqs
        low, high = self.low_freq_factor, self.high_freq_factor
        blend = (self.original_max_positions / wavelength - low) / (high - low)
        blended = (1 - blend) * freqs / self.factor + blend * freqs
        long_wave = wavelength > self.original_max_positions / low
        short_wave = wavelength < self.original_max_positions / high
        return jnp.where(long_wave, freqs / self.factor, jnp.where(short_wave, freqs, blended))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Model hyper-parameters.

    ``sliding_window`` follows Hugging Face Mistral: a token sees itself and
    the ``sliding_window - 1`` tokens before it. ``layer_windows`` overrides it
    per layer (``None`` entries are global layers), e.g. Gemma-style
    ``(4096, None) * n``.

    Family options (defaults are Llama's): ``qkv_bias`` (Qwen2.5), ``qk_norm``
    (RMSNorm over head_dim on q and k before RoPE: Qwen3, Gemma 3),
    ``norm_weight_offset`` (1.0: norms scale by ``1 + w``, as Gemma stores
    them), ``sandwich_norms`` (extra norms on the attention and MLP outputs,
    Gemma 2/3), ``mlp_activation`` (``"silu"`` SwiGLU or ``"gelu_tanh"``
    GeGLU), ``scale_embeddings`` (embeddings times ``sqrt(embed_dim)``),
    ``query_pre_attn_scalar`` (attention scale ``s ** -0.5`` instead of
    ``head_dim ** -0.5``), ``attention_logits_soft_cap`` and
    ``final_logits_soft_cap`` (``cap * tanh(x / cap)``, Gemma 2),
    ``local_rope_theta`` (RoPE base of windowed layers, which then ignore
    ``rope_scaling``: Gemma 3).
    """

    vocab_size: int = 256
    embed_dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 688
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # a dict of RopeScaling fields also works
    norm_eps: float = 1e-5
    sliding_window: int | None = None
    layer_windows: tuple[int | None, ...] | None = None
    tie_embeddings: bool = False
    dtype: str = "bfloat16"  # compute dtype; parameters are float32
    attention_implementation: str | None = None
    sequence_method: str = "ulysses"
    remat: bool = False  # recompute each block's activations in the backward pass
    # Family options (see the class docstring); the defaults give Llama.
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_weight_offset: float = 0.0
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attention_logits_soft_cap: float | None = None
    final_logits_soft_cap: float | None = None
    local_rope_theta: float | None = None

    def __post_init__(self):
        self._check_family_options()
        if isinstance(self.rope_scaling, dict):  # from JSON / TOML configs
            unknown = set(self.rope_scaling) - {f.name for f in dataclasses.fields(RopeScaling)}
            if unknown:
                raise ValueError(f"rope_scaling has unknown field(s) {sorted(unknown)}")
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.layer_windows, list):  # from JSON / TOML configs
            object.__setattr__(self, "layer_windows", tuple(self.layer_windows))
        self._validate_fields()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                "set head_dim"
            )
        if self.layer_windows is not None and len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        for window in (self.sliding_window, *(self.layer_windows or ())):
            if window is not None and window < 1:
                raise ValueError(f"sliding windows must be >= 1 token, got {window}")

    def _validate_fields(self):
        """Types and ranges of every field, naming it (before anything divides by one)."""
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("mlp_dim", self.mlp_dim, minimum=1)
        check_optional_int("head_dim", self.head_dim, minimum=2)
        check_float("rope_theta", self.rope_theta, minimum=0.0, open_min=True)
        check_float("norm_eps", self.norm_eps, minimum=0.0, open_min=True)
        check_optional_int("sliding_window", self.sliding_window, minimum=1)
        if self.layer_windows is not None:
            if not isinstance(self.layer_windows, tuple):
                raise ValueError(f"layer_windows must be a tuple, got {self.layer_windows!r}")
            for i, window in enumerate(self.layer_windows):
                check_optional_int(f"layer_windows[{i}]", window, minimum=1)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"rope_scaling must be a RopeScaling or dict, got {self.rope_scaling!r}"
            )
        for name in (
            "tie_embeddings",
            "remat",
            "qkv_bias",
            "qk_norm",
            "sandwich_norms",
            "scale_embeddings",
        ):
            check_bool(name, getattr(self, name))
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("attention_implementation", self.attention_implementation, IMPLEMENTATIONS)
        check_choice("sequence_method", self.sequence_method, SEQUENCE_METHODS)
        # RoPE rotates halves of each head: an odd head_dim cannot be split.
        head_dim = self.head_dim or self.embed_dim // self.num_heads
        if head_dim % 2:
            raise ValueError(f"head dimension must be even for RoPE, got {head_dim}")

    def _check_family_options(self):
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"mlp_activation {self.mlp_activation!r} must be one of {tuple(MLP_ACTIVATIONS)}"
            )
        for name in (
            "query_pre_attn_scalar",
            "attention_logits_soft_cap",
            "final_logits_soft_cap",
            "local_rope_theta",
        ):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if self.norm_weight_offset not in (0.0, 1.0):
            raise ValueError(
                f"norm_weight_offset must be 0 (Llama: x * w) or 1 (Gemma: x * (1 + w)), "
                f"got {self.norm_weight_offset!r}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def attention_scale(self) -> float:
        """Logit scale: ``query_pre_attn_scalar ** -0.5`` if set, else ``head_dim ** -0.5``."""
        return float((self.query_pre_attn_scalar or self.dim_per_head) ** -0.5)

    def rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """``(theta, scaling)`` of ``layer``: windowed layers use ``local_rope_theta`` if set."""
        if self.local_rope_theta is not None and self.window(layer) is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    def window(self, layer: int) -> int | None:
        """Sliding window (in tokens, self included) of ``layer``; None = global."""
        if self.layer_windows is not None:
            return self.layer_windows[layer]
        return self.sliding_window

    def left_window(self, layer: int) -> int | None:
        window = self.window(layer)
        return None if window is None else window - 1


def _param(rngs, shape, logical_axes, scale=None):
    """float32 parameter with truncated-normal init (fan-in scaled) and logical axes."""
    std = scale if scale is not None else shape[0] ** -0.5
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value, logical_axes=logical_axes)


_captured_inputs: dict | None = None  # set by collect_linear_inputs (eager runs only)


class Linear(nnx.Module):
    """``y = x @ W``; ``W`` dense ``[in, out]``, SparseWeight or QuantizedWeight.

    ``parallel`` ("column" / "row") says how the layer is split over the
    ``tensor`` axis when a mesh is active (Megatron); ``act_bits=8`` selects
    W8A8 once the weight is quantized.
    """

    def __init__(
        self, in_features, out_features, logical_axes, *, parallel, rngs, scale=None, bias=False
    ):
        self.kernel = _param(rngs, (in_features, out_features), logical_axes, scale)
        # A dense bias (Qwen2.5's q/k/v) stays dense when the kernel is sparsified/quantized.
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), jnp.float32), logical_axes=logical_axes[1:])
            if bias
            else None
        )
        self.parallel = parallel
        self.act_bits: int | None = None

    def _add_bias(self, y):
        if self.bias is None:
            return y
        return y + self.bias.get_value().astype(y.dtype)

    def __call__(self, x):
        if _captured_inputs is not None:
            _captured_inputs.setdefault(id(self), []).append(x)
        w = self.kernel.get_value()
        mesh = jax.sharding.get_abstract_mesh()
        # FsdpWeight: dense weights whose fsdp collectives are quantized (comm_quant).
        split = mesh.shape.get(ps.TENSOR, 1) > 1 or isinstance(w, SparseShards | ps.FsdpWeight)
        if not mesh.empty and split:
            wrapper = ps.column_parallel if self.parallel == "column" else ps.row_parallel
            return self._add_bias(wrapper(x, w, act_bits=self.act_bits))
        return self._add_bias(linear(x, w, act_bits=self.act_bits))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis; multiplies by ``offset + scale`` (Gemma: offset 1,
    scale stored around 0; Llama: offset 0, scale around 1), in float32."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        init = jnp.full((dim,), 1.0 - offset, jnp.float32)  # identity at init either way
        self.scale = nnx.Param(init, logical_axes=("norm",))
        self.eps = eps
        self.offset = offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + self.scale.get_value())).astype(x.dtype)


def rope(x, positions, theta: float, scaling: RopeScaling | None = None):
    """Rotary embedding ("rotate half", as Llama): x ``[B, T, H, D]``, positions ``[B, T]``."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is not None:
        freqs = scaling.apply(freqs)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: TransformerConfig, layer: int, *, rngs):
        e, h, kh, d = config.embed_dim, config.num_heads, config.num_kv_heads, config.dim_per_head
        self.config, self.layer = config, layer
        column = functools.partial(Linear, parallel="column", rngs=rngs, bias=config.qkv_bias)
        self.q_proj = column(e, h * d, ("embed", "heads"))
        self.k_proj = column(e, kh * d, ("embed", "kv_heads"))
        self.v_proj = column(e, kh * d, ("embed", "kv_heads"))
        self.o_proj = Linear(h * d, e, ("heads", "embed"), parallel="row", rngs=rngs)
        norm = functools.partial(RMSNorm, d, config.norm_eps, config.norm_weight_offset)
        self.q_norm = norm() if config.qk_norm else None
        self.k_norm = norm() if config.qk_norm else None

    def qkv(self, x, positions):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.dim_per_head)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.dim_per_head)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.dim_per_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        theta, scaling = c.rope(self.layer)
        q, k = (rope(x, positions, theta, scaling) for x in (q, k))
        return q, k, v

    def __call__(self, x, positions):
        c = self.config
        q, k, v = self.qkv(x, positions)
        left = c.left_window(self.layer)
        window = None if left is None else (left, 0)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            out = dot_product_attention(
                q,
                k,
                v,
                scale=c.attention_scale,
                is_causal=True,
                local_window_size=window,
                logits_soft_cap=c.attention_logits_soft_cap,
                implementation=c.attention_implementation,
            )
        else:
            method = (
                c.sequence_method if left is not None or c.sequence_method != "halo" else "ring"
            )
            out = ps.attention(
                q,
                k,
                v,
                is_causal=True,
                local_window_size=window,
                sequence_method=method,
                scale=c.attention_scale,
                logits_soft_cap=c.attention_logits_soft_cap,
                implementation=c.attention_implementation,
            )
        return self.o_proj(out.reshape(*x.shape[:2], -1)), (k, v)


class MLP(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs):
        e, f = config.embed_dim, config.mlp_dim
        self.gate_proj = Linear(e, f, ("embed", "mlp"), parallel="column", rngs=rngs)
        self.up_proj = Linear(e, f, ("embed", "mlp"), parallel="column", rngs=rngs)
        self.down_proj = Linear(f, e, ("mlp", "embed"), parallel="row", rngs=rngs)
        self.activation = config.mlp_activation

    def __call__(self, x):
        gate = MLP_ACTIVATIONS[self.activation](self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm block. ``post_attention_norm`` is the norm before the MLP (HF Llama's
    ``post_attention_layernorm``); with ``sandwich_norms`` (Gemma) the attention and
    MLP outputs are normed too (``attention_out_norm``, ``mlp_out_norm``)."""

    def __init__(self, config: TransformerConfig, layer: int, *, rngs):
        norm = functools.partial(
            RMSNorm, config.embed_dim, config.norm_eps, config.norm_weight_offset
        )
        self.input_norm = norm()
        self.attention = Attention(config, layer, rngs=rngs)
        self.post_attention_norm = norm()
        self.mlp = MLP(config, rngs=rngs)
        self.attention_out_norm = norm() if config.sandwich_norms else None
        self.mlp_out_norm = norm() if config.sandwich_norms else None

    def __call__(self, x, positions):
        attended, kv = self.attention(self.input_norm(x), positions)
        return self.residual_mlp(x, attended), kv

    def residual_mlp(self, x, attended):
        """Adds the (projected) attention output to ``x``, then the MLP branch.
        Shared with generation's decode step."""
        if self.attention_out_norm is not None:
            attended = self.attention_out_norm(attended)
        x = x + attended
        h = self.mlp(self.post_attention_norm(x))
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        return x + h


class Transformer(nnx.Module):
    """``tokens [B, T] int32 -> logits [B, T, vocab] float32``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embed = _param(rngs, (config.vocab_size, config.embed_dim), ("vocab", "embed"), 1.0)
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.embed_dim, config.norm_eps, config.norm_weight_offset)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Linear(
                config.embed_dim,
                config.vocab_size,
                ("embed", "vocab"),
                parallel="column",
                rngs=rngs,
            )
        )

    def hidden(self, tokens, positions=None, *, return_kv=False):
        c = self.config
        if not hasattr(tokens, "ndim") or tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got {getattr(tokens, 'shape', tokens)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            # jnp.take would truncate float ids silently; ids >= vocab_size give NaN rows
            # (out-of-range gathers fill), which generate() checks on the host.
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed_tokens(tokens)
        x = ps.shard_as(x, ("batch", "length", "act_embed"))
        kvs = []
        for block in self.blocks:
            if c.remat:
                x, kv = nnx.remat(lambda blk, x, p: blk(x, p))(block, x, positions)
            else:
                x, kv = block(x, positions)
            x = ps.shard_as(x, ("batch", "length", "act_embed"))
            kvs.append(kv)
        x = self.final_norm(x)
        return (x, kvs) if return_kv else x

    def embed_tokens(self, tokens):
        """``[B, T]`` ids -> ``[B, T, embed]`` in the compute dtype (Gemma: times sqrt(embed))."""
        c = self.config
        x = jnp.take(self.embed.get_value(), tokens, axis=0).astype(c.dtype)
        if c.scale_embeddings:  # the factor rounded to the compute dtype, as HF does
            x = x * jnp.asarray(c.embed_dim**0.5, c.dtype)
        return x

    def logits(self, x):
        if self.lm_head is None:
            w = self.embed.get_value()
            logits = jnp.einsum(
                "bte,ve->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32
            )
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        cap = self.config.final_logits_soft_cap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(self, tokens, positions=None):
        return self.logits(self.hidden(tokens, positions))


def logical_shardings(model: nnx.Module, mesh) -> nnx.State:
    """NamedSharding per dense parameter from its ``logical_axes`` metadata
    (sparse / quantized weights: see :func:`shard_model`)."""
    state = nnx.state(model)
    replicated = NamedSharding(mesh, P())

    def sharding(variable):
        value = variable.get_value()
        names = variable.get_metadata().get("logical_axes")
        if not hasattr(value, "ndim"):  # sparse / quantized: placed by shard_model
            return replicated
        if names is None or len(names) != value.ndim:
            return replicated
        return ps.named_sharding(mesh, names)

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Places every parameter on ``mesh`` according to the logical-axis rules.

    Quantized linears are split like their dense counterparts (column-parallel:
    out over ``tensor``, in over ``fsdp``; row-parallel the other way); sparse
    linears are repacked per tensor shard (``split_sparse``), their values
    split over ``fsdp`` and gathered per layer (ZeRO-3), as dense weights are.
    """
    if not isinstance(mesh, jax.sharding.Mesh) or set(mesh.axis_names) != set(ps.AXES):
        raise ValueError(f"mesh must be a pallax.sharding.make_mesh() Mesh, got {mesh!r}")
    tensor, fsdp = mesh.shape[ps.TENSOR], mesh.shape[ps.FSDP]

    def place(w, specs):
        return jax.device_put(w, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    for path, layer in nnx.iter_modules(model):
        if not isinstance(layer, Linear):
            continue
        w = layer.kernel.get_value()
        column = layer.parallel == "column"
        if isinstance(w, QuantizedWeight):
            out_axis, in_axis = (ps.TENSOR, ps.FSDP) if column else (ps.FSDP, ps.TENSOR)
            groups = w.scales.shape[1]
            shard_inputs = groups // mesh.shape[in_axis] * w.group_size
            # int4 packs nibbles in blocks of PACK_BLOCK inputs: a tensor shard (computed
            # on as it is; fsdp shards are gathered first) must hold whole blocks.
            split_block = w.bits == 4 and in_axis == ps.TENSOR and shard_inputs % PACK_BLOCK
            if (
                w.values.shape[0] % mesh.shape[out_axis]
                or groups % mesh.shape[in_axis]
                or split_block
            ):
                raise ValueError(
                    f"{'.'.join(map(str, path))}: quantized weight with {w.values.shape[0]} "
                    f"padded outputs and {groups} groups of {w.group_size} inputs cannot be "
                    f"split {mesh.shape[out_axis]} x {mesh.shape[in_axis]} over "
                    f"({out_axis}, {in_axis})"
                    + (f" (int4 shards hold multiples of {PACK_BLOCK} inputs)" * bool(split_block))
                    + "; use a smaller group_size or mesh"
                )
            layer.kernel.set_value(place(w, w.partition_specs(out_axis, in_axis)))
        elif isinstance(w, SparseWeight | SparseShards):
            if isinstance(w, SparseShards) and w.stacked.values.shape[0] != tensor:
                w = w.merge()  # packed for another tensor size: re-split below
            if isinstance(w, SparseWeight) and (tensor > 1 or fsdp > 1):
                w = split_sparse(w, tensor, "out" if column else "in", values_multiple=fsdp)
            if isinstance(w, SparseShards):
                w = place(w, ps.sparse_specs(w, fsdp))
            layer.kernel.set_value(w)
    state = nnx.state(model)
    shardings = dict(nnx.to_flat_state(logical_shardings(model, mesh)))
    for path, variable in nnx.to_flat_state(state):
        if isinstance(variable.get_value(), jax.Array):
            variable.set_value(jax.device_put(variable.get_value(), shardings[path]))
    nnx.update(model, state)
    return model
