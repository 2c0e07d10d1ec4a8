"""Autoregressive generation with a preallocated KV cache.

Global layers keep a cache of ``prompt_len + max_new_tokens`` slots; sliding-
window layers keep a ring buffer of ``window`` slots (slot = position % window),
so their memory is bounded by the window. The prompt is prefilled with one
forward pass; the decode loop is a single ``lax.while_loop`` inside one jit
(no Python loop per token), each step calling the decode attention kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallax._checks import check_float, check_int, check_optional_int
from pallax.models.transformer import Transformer
from pallax.pallas_kernels import decode_attention
from pallax.pallas_kernels.decode_attention_mgpu import DecodeGeometry


def cache_lengths(config, max_len: int) -> list[int]:
    """Slots per layer: the window for sliding-window layers, else ``max_len``."""
    return [
        min(max_len, config.window(i)) if config.window(i) else max_len
        for i in range(config.num_layers)
    ]


def _is_rolling(config, layer: int, slots: int) -> bool:
    """Ring buffer iff the layer is windowed and its cache is exactly the window."""
    return config.window(layer) is not None and slots == config.window(layer)


def _fill_cache(k, lengths, slots: int, rolling: bool):
    """Cache ``[B, slots, H, D]`` holding, for each slot, the latest prompt position
    ``< lengths[b]`` that maps to it (``k`` is the prefill's ``[B, P, H, D]``)."""
    geometry = DecodeGeometry(left=0, num_new=1, group=1, cache_len=slots, rolling=rolling)
    slot_ids = jnp.arange(slots)
    positions = jax.vmap(lambda n: geometry.positions(slot_ids, n))(lengths)  # [B, slots]
    source = jnp.clip(positions, 0, k.shape[1] - 1)
    gathered = jnp.take_along_axis(k, source[:, :, None, None], axis=1)
    return jnp.where((positions >= 0)[:, :, None, None], gathered, 0).astype(k.dtype)


def _sample(logits, rng, temperature, top_k, top_p):
    """logits ``[B, V]`` -> tokens ``[B]``; temperature 0 is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p (always at least one token).
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _decode_step(model: Transformer, caches, tokens, positions):
    """One new token per sequence: tokens/positions ``[B]`` -> (logits ``[B, V]``, caches)."""
    c = model.config
    x = model.embed_tokens(tokens[:, None])
    pos = positions[:, None]
    new_caches = []
    batch = jnp.arange(tokens.shape[0])
    for layer, (block, (k_cache, v_cache)) in enumerate(zip(model.blocks, caches, strict=True)):
        attention = block.attention
        q, k, v = attention.qkv(block.input_norm(x), pos)
        slots = k_cache.shape[1]
        rolling = _is_rolling(c, layer, slots)
        slot = positions % slots if rolling else positions
        k_cache = k_cache.at[batch, slot].set(k[:, 0])
        v_cache = v_cache.at[batch, slot].set(v[:, 0])
        left = c.left_window(layer)
        attended = decode_attention(
            q,
            k_cache,
            v_cache,
            positions + 1,
            scale=c.attention_scale,
            local_window_size=left,
            rolling=rolling,
            logits_soft_cap=c.attention_logits_soft_cap,
            implementation=c.attention_implementation,
        )
        x = block.residual_mlp(x, attention.o_proj(attended.reshape(x.shape[0], 1, -1)))
        new_caches.append((k_cache, v_cache))
    logits = model.logits(model.final_norm(x))[:, 0]
    return logits, new_caches


@functools.partial(
    nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "stop_tokens")
)
def _generate(
    model, prompt, lengths, rng, *, max_new_tokens, temperature, top_k, top_p, stop_tokens
):
    c = model.config
    batch, prompt_len = prompt.shape
    max_len = prompt_len + max_new_tokens
    hidden, kvs = model.hidden(prompt, return_kv=True)
    caches = []
    for layer, (k, v) in enumerate(kvs):
        slots = cache_lengths(c, max_len)[layer]
        rolling = _is_rolling(c, layer, slots)
        caches.append(
            (_fill_cache(k, lengths, slots, rolling), _fill_cache(v, lengths, slots, rolling))
        )
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    logits = model.logits(last)[:, 0]
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    fill = stop_tokens[0] if stop_tokens else 0
    # Prefilled with the fill token: the loop may end early once all stopped.
    out = jnp.full((batch, max_new_tokens), fill, jnp.int32)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, logits, caches, positions, done, rng = state
        rng, key = jax.random.split(rng)
        token = _sample(logits, key, temperature, top_k, top_p)
        token = jnp.where(done, fill, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stops)
        logits, caches = _decode_step(model, caches, token, positions)
        return step + 1, out, logits, caches, positions + 1, done, rng

    init = (jnp.int32(0), out, logits, caches, lengths, jnp.zeros((batch,), bool), rng)
    step, out, *_ = jax.lax.while_loop(cond, body, init)
    return out, step


def _token_ids(name: str, values) -> np.ndarray:
    """Host int64 copy of token ids / lengths; floats are rejected, not truncated."""
    if isinstance(values, jax.core.Tracer):
        raise ValueError(f"{name} must be concrete (generate is not meant to be traced)")
    try:
        array = np.asarray(values)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular array of ints: {e}") from None
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def generate(
    model: Transformer,
    prompt_tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: tuple[int, ...] = (),
    prompt_lengths=None,
):
    """Samples ``max_new_tokens`` after each prompt.

    Args:
      prompt_tokens: ``[batch, prompt_len]`` int32, right-padded; or a list of
        token lists of different lengths.
      prompt_lengths: ``[batch]`` real prompt lengths (default: all full).
      stop_tokens: a sequence ends after emitting one of these (later slots
        repeat the first stop token); the loop ends when all sequences stopped.

    Every argument is checked on the host before anything compiles: token ids
    in ``[0, vocab_size)``, integer dtypes (floats are not truncated), finite
    ``temperature >= 0``, ``0 < top_p <= 1``, ``1 <= top_k <= vocab_size``.

    Returns:
      ``[batch, max_new_tokens]`` int32 new tokens.
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"model must be a pallax Transformer, got {type(model).__name__}")
    vocab = model.config.vocab_size
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    temperature = check_float("temperature", temperature, minimum=0.0)
    top_p = check_float("top_p", top_p, minimum=0.0, maximum=1.0, open_min=True)
    top_k = check_optional_int("top_k", top_k, minimum=1, maximum=vocab)
    seed = check_int("seed", seed)
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (list, tuple)):
        raise ValueError(f"stop_tokens must be a tuple of token ids, got {stop_tokens!r}")
    stop_tokens = tuple(
        check_int(f"stop_tokens[{i}]", t, minimum=0, maximum=vocab - 1)
        for i, t in enumerate(stop_tokens)
    )
    if (
        isinstance(prompt_tokens, (list, tuple))
        and prompt_tokens
        and any(isinstance(p, (list, tuple, np.ndarray)) for p in prompt_tokens)
    ):
        if not all(isinstance(p, (list, tuple, np.ndarray)) for p in prompt_tokens):
            raise ValueError("prompt_tokens mixes token lists and single tokens")
        lengths = [len(p) for p in prompt_tokens]
        if prompt_lengths is not None and list(np.asarray(prompt_lengths).ravel()) != lengths:
            raise ValueError(
                f"prompt_lengths {prompt_lengths!r} contradicts the list prompts' lengths "
                f"{lengths}: give a padded array with prompt_lengths, or lists without"
            )
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} of prompt_tokens is empty")
        padded = np.zeros((len(prompt_tokens), max(lengths)), np.int64)
        for i, p in enumerate(prompt_tokens):
            padded[i, : len(p)] = _token_ids(f"prompt_tokens[{i}]", p)
        prompt_tokens, prompt_lengths = padded, lengths
    prompt = _token_ids("prompt_tokens", prompt_tokens)
    if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt_tokens must be [batch > 0, prompt_len > 0], got shape {prompt.shape}"
        )
    if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
        bad = tuple(int(i) for i in np.argwhere((prompt < 0) | (prompt >= vocab))[0])
        raise ValueError(
            f"prompt_tokens[{bad[0]}, {bad[1]}]={int(prompt[bad])} is not a token id in "
            f"[0, vocab_size={vocab})"
        )
    lengths = _token_ids(
        "prompt_lengths",
        prompt_lengths if prompt_lengths is not None else [prompt.shape[1]] * prompt.shape[0],
    )
    if lengths.shape != (prompt.shape[0],) or lengths.min() < 1 or lengths.max() > prompt.shape[1]:
        raise ValueError(
            f"prompt_lengths {lengths.tolist()} must hold one length in [1, {prompt.shape[1]}] "
            f"per row of prompt_tokens {prompt.shape}"
        )
    prompt, lengths = jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths, jnp.int32)
    out, _ = _generate(
        model,
        prompt,
        lengths,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
    )
    return out
