"""A small TP + DP step (MLP and attention) shared by the sharding tests."""

import jax
import jax.numpy as jnp
import numpy as np

from pallax import sharding as ps

BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM = 8, 16, 32, 64, 4, 2, 8


def inputs():
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.2  # noqa: E731
    params = {
        "w_up": normal(EMBED, MLP),
        "w_down": normal(MLP, EMBED),
        "wq": normal(EMBED, HEADS * HEAD_DIM),
        "wk": normal(EMBED, KV_HEADS * HEAD_DIM),
        "wv": normal(EMBED, KV_HEADS * HEAD_DIM),
    }
    names = {
        "w_up": ("embed", "mlp"),
        "w_down": ("mlp", "embed"),
        "wq": ("embed", "heads"),
        "wk": ("embed", "kv_heads"),
        "wv": ("embed", "kv_heads"),
    }
    return params, normal(BATCH, LENGTH, EMBED), names


def loss_fn(params, x, sharded=True, sequence_method="ulysses"):
    if sharded:
        up = ps.column_parallel(x, params["w_up"])
        h = ps.row_parallel(jnp.tanh(up), params["w_down"])
    else:
        h = jnp.tanh(x @ params["w_up"]) @ params["w_down"]
    b, n = x.shape[:2]
    q = (h @ params["wq"]).reshape(b, n, HEADS, HEAD_DIM)
    k = (h @ params["wk"]).reshape(b, n, KV_HEADS, HEAD_DIM)
    v = (h @ params["wv"]).reshape(b, n, KV_HEADS, HEAD_DIM)
    if sharded:
        out = ps.attention(
            q, k, v, is_causal=True, local_window_size=5, sequence_method=sequence_method
        )
    else:
        from pallax.pallas_kernels import dot_product_attention

        out = dot_product_attention(q, k, v, is_causal=True, local_window_size=5)
    return jnp.mean(out**2) + jnp.mean(h**2)


def reference():
    params, x, _ = inputs()
    loss, grads = jax.value_and_grad(loss_fn)(params, x, sharded=False)
    return float(loss), grads
