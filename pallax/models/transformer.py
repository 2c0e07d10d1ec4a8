"""Decoder-only transformer (Llama / Mistral family) in Flax NNX.

Token embedding, RoPE, RMSNorm, GQA attention with an optional sliding window
per layer, SwiGLU MLP, tied or untied output head. Every projection is a
:class:`Linear` whose weight may be dense, a ``SparseWeight`` or a
``QuantizedWeight``; all of them go through :func:`pallax.pallas_kernels.linear`.
Parameters carry ``logical_axes`` metadata that :mod:`pallax.sharding` maps to a
mesh; under ``jax.set_mesh`` attention runs through ``pallax.sharding.attention``
(kernels on local shards).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallax import sharding as ps
from pallax.pallas_kernels import (
    QuantizedWeight,
    SparseWeight,
    dot_product_attention,
    linear,
    split_sparse,
)
from pallax.pallas_kernels.sparse import SparseShards

ROPE_SCALINGS = ("linear", "llama3")


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
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
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

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from JSON / TOML configs
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
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

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

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

    def __init__(self, in_features, out_features, logical_axes, *, parallel, rngs, scale=None):
        self.kernel = _param(rngs, (in_features, out_features), logical_axes, scale)
        self.parallel = parallel
        self.act_bits: int | None = None

    def __call__(self, x):
        if _captured_inputs is not None:
            _captured_inputs.setdefault(id(self), []).append(x)
        w = self.kernel.get_value()
        mesh = jax.sharding.get_abstract_mesh()
        # FsdpWeight: dense weights whose fsdp collectives are quantized (comm_quant).
        split = mesh.shape.get(ps.TENSOR, 1) > 1 or isinstance(w, SparseShards | ps.FsdpWeight)
        if not mesh.empty and split:
            wrapper = ps.column_parallel if self.parallel == "column" else ps.row_parallel
            return wrapper(x, w, act_bits=self.act_bits)
        return linear(x, w, act_bits=self.act_bits)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale.get_value()).astype(x.dtype)


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
        self.q_proj = Linear(e, h * d, ("embed", "heads"), parallel="column", rngs=rngs)
        self.k_proj = Linear(e, kh * d, ("embed", "kv_heads"), parallel="column", rngs=rngs)
        self.v_proj = Linear(e, kh * d, ("embed", "kv_heads"), parallel="column", rngs=rngs)
        self.o_proj = Linear(h * d, e, ("heads", "embed"), parallel="row", rngs=rngs)

    def qkv(self, x, positions):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.dim_per_head)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.dim_per_head)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.dim_per_head)
        q, k = (rope(x, positions, c.rope_theta, c.rope_scaling) for x in (q, k))
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
                is_causal=True,
                local_window_size=window,
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
                implementation=c.attention_implementation,
            )
        return self.o_proj(out.reshape(*x.shape[:2], -1)), (k, v)


class MLP(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs):
        e, f = config.embed_dim, config.mlp_dim
        self.gate_proj = Linear(e, f, ("embed", "mlp"), parallel="column", rngs=rngs)
        self.up_proj = Linear(e, f, ("embed", "mlp"), parallel="column", rngs=rngs)
        self.down_proj = Linear(f, e, ("mlp", "embed"), parallel="row", rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, config: TransformerConfig, layer: int, *, rngs):
        self.input_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.attention = Attention(config, layer, rngs=rngs)
        self.post_attention_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions):
        attended, kv = self.attention(self.input_norm(x), positions)
        x = x + attended
        return x + self.mlp(self.post_attention_norm(x)), kv


class Transformer(nnx.Module):
    """``tokens [B, T] int32 -> logits [B, T, vocab] float32``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(rngs, (config.vocab_size, config.embed_dim), ("vocab", "embed"), 1.0)
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.embed_dim, config.norm_eps)
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
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed.get_value(), tokens, axis=0).astype(c.dtype)
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

    def logits(self, x):
        if self.lm_head is None:
            w = self.embed.get_value()
            return jnp.einsum(
                "bte,ve->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32
            )
        return self.lm_head(x).astype(jnp.float32)

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
            if w.values.shape[0] % mesh.shape[out_axis] or groups % mesh.shape[in_axis]:
                raise ValueError(
                    f"{'.'.join(map(str, path))}: quantized weight with {w.values.shape[0]} "
                    f"padded outputs and {groups} groups of {w.group_size} inputs cannot be "
                    f"split {mesh.shape[out_axis]} x {mesh.shape[in_axis]} over "
                    f"({out_axis}, {in_axis}); use a smaller group_size or mesh"
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
