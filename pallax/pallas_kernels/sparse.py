"""Unstructured-sparse weights in a tiled bitmap format, pruning, and SpMM.

Layout of :class:`SparseWeight` for a logical ``[in_features K, out_features N]``
weight, stored transposed (``[N, K]``, K-major like :class:`QuantizedWeight`)
and zero-padded to whole tiles of ``TILE_ROWS=64`` outputs x ``TILE_K=64``
inputs; ``nT = Np / 64``, ``kT = Kp / 64``:

* ``bitmap``: ``uint32 [nT, kT, 128]``, tile-major. Word ``2 r + h`` of a tile
  holds row ``r``'s inputs ``32 h .. 32 h + 31``, bit ``i`` for input
  ``32 h + i`` (1 bit per element; each tile's 512 bytes are contiguous, so
  one TMA copy fetches them).
* ``values``: the nonzeros ``[nnz]`` in the weight dtype, tile after tile (tiles
  row-major over ``(n_tile, k_tile)``), row-major inside a tile, i.e. in the
  order of the bitmap's bits.
* ``tile_offsets``: ``int32 [nT, kT, 4]``, index in ``values`` of the first
  nonzero of each 16-row quarter of each tile (what one warp decodes).

Bytes per element at density ``d``: ``2 d + 1/8 + 1/256`` for bf16 values, vs
2 dense; Tiled-CSL (Flash-LLM) costs ``4 d``. Nonzero ``i`` of a quarter is
``values[offset + i]``, so a tile decodes with popcounts of its bitmap words
and a prefix sum across them (see :mod:`pallax.pallas_kernels.sparse_matmul_mgpu`).

``sparse_matmul`` runs the Mosaic GPU kernel of
:mod:`~pallax.pallas_kernels.sparse_matmul_mgpu` for skinny products on Hopper
and XLA (decode, then a dense dot) elsewhere. Gradients flow to ``x`` and to
the nonzero ``values`` only: the mask is fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallax._checks import check_array, check_choice, check_finite, check_float, check_int
from pallax.pallas_kernels import _tuning
from pallax.pallas_kernels import sparse_matmul_mgpu as sparse_mgpu
from pallax.pallas_kernels._dispatch import choose_implementation, cotangent_like

TILE_ROWS = 64
TILE_K = 64
WORD_BITS = 32


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tile_major(mask_t):
    """[Np, Kp] -> [Np/64, Kp/64, 64 * 64]: element order of ``values`` (numpy or jax)."""
    np_, kp = mask_t.shape
    tiles = mask_t.reshape(np_ // TILE_ROWS, TILE_ROWS, kp // TILE_K, TILE_K)
    return tiles.transpose(0, 2, 1, 3).reshape(np_ // TILE_ROWS, kp // TILE_K, -1)


def _from_tile_major(tiles, np_: int, kp: int):
    rows = tiles.reshape(np_ // TILE_ROWS, kp // TILE_K, TILE_ROWS, TILE_K)
    return rows.transpose(0, 2, 1, 3).reshape(np_, kp)


QUARTER = TILE_ROWS * TILE_K // 4  # elements of a 16-row quarter tile (one warp)
WORDS_PER_TILE = TILE_ROWS * TILE_K // WORD_BITS


def _pack_bitmap(mask_t: np.ndarray) -> np.ndarray:
    """bool ``[Np, Kp]`` -> uint32 ``[nT, kT, 128]`` (tile-major words)."""
    tiles = _tile_major(mask_t)
    bits = tiles.reshape(*tiles.shape[:2], WORDS_PER_TILE, WORD_BITS).astype(np.uint64)
    weights = np.uint64(1) << np.arange(WORD_BITS, dtype=np.uint64)
    return (bits * weights).sum(axis=-1).astype(np.uint32)


def _bitmap_tiles(bitmap):
    """uint32 ``[nT, kT, 128]`` -> bool ``[nT, kT, 4096]`` (numpy or jax)."""
    xp = jnp if isinstance(bitmap, jax.Array) else np
    shifts = xp.arange(WORD_BITS, dtype=xp.uint32)
    bits = (bitmap[..., None] >> shifts) & xp.uint32(1)
    return bits.reshape(*bitmap.shape[:2], -1).astype(bool)


def _unpack_bits(bitmap):
    """uint32 ``[nT, kT, 128]`` -> bool ``[Np, Kp]`` (numpy or jax)."""
    n_tiles, k_tiles = bitmap.shape[:2]
    return _from_tile_major(_bitmap_tiles(bitmap), n_tiles * TILE_ROWS, k_tiles * TILE_K)


def _quarter_offsets(tiles_mask: np.ndarray) -> np.ndarray:
    """bool ``[nT, kT, 4096]`` -> int32 ``[nT, kT, 4]`` exclusive prefix of nonzero counts."""
    counts = tiles_mask.reshape(*tiles_mask.shape[:2], 4, QUARTER).sum(axis=-1)
    flat = np.concatenate([[0], np.cumsum(counts.reshape(-1))[:-1]])
    return flat.reshape(counts.shape).astype(np.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseWeight:
    """A sparse ``[in_features, out_features]`` weight in tiled bitmap format."""

    values: jax.Array
    bitmap: jax.Array
    tile_offsets: jax.Array
    in_features: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(self))

    @classmethod
    def from_dense(cls, w, mask=None) -> SparseWeight:
        """Packs an already pruned ``[in, out]`` matrix: its nonzeros, or the
        positions of ``mask`` (bool ``[in, out]``, which may hold zeros). Not jittable."""
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"expected a 2D [in_features, out_features] weight, got {w.shape}")
        if mask is not None and np.shape(mask) != w.shape:
            raise ValueError(f"mask shape {np.shape(mask)} != weight shape {w.shape}")
        k, n = w.shape
        kp, np_ = _round_up(max(k, 1), TILE_K), _round_up(max(n, 1), TILE_ROWS)
        w_t = np.zeros((np_, kp), w.dtype)
        w_t[:n, :k] = w.T
        if mask is None:
            mask_t = w_t != 0
        else:
            mask_t = np.zeros((np_, kp), bool)
            mask_t[:n, :k] = np.asarray(mask, bool).T
        tiles_mask = _tile_major(mask_t)
        return cls(
            values=jnp.asarray(_tile_major(w_t)[tiles_mask]),
            bitmap=jnp.asarray(_pack_bitmap(mask_t)),
            tile_offsets=jnp.asarray(_quarter_offsets(tiles_mask)),
            in_features=k,
            out_features=n,
        )

    def validate(self) -> SparseWeight:
        """Checks the format's invariants on concrete arrays; raises ValueError naming them."""
        n_tiles = -(-self.out_features // TILE_ROWS)
        k_tiles = -(-self.in_features // TILE_K)
        if self.bitmap.dtype != jnp.uint32:
            raise ValueError(f"bitmap must be uint32, got {self.bitmap.dtype}")
        if self.bitmap.shape != (n_tiles, k_tiles, WORDS_PER_TILE):
            raise ValueError(
                f"bitmap shape {self.bitmap.shape} != {(n_tiles, k_tiles, WORDS_PER_TILE)} "
                f"for a [{self.in_features}, {self.out_features}] weight in "
                f"{TILE_ROWS}x{TILE_K} tiles"
            )
        if self.tile_offsets.dtype != jnp.int32 or self.tile_offsets.shape != (
            n_tiles,
            k_tiles,
            4,
        ):
            raise ValueError(
                f"tile_offsets must be int32 {(n_tiles, k_tiles, 4)}, got "
                f"{self.tile_offsets.dtype} {self.tile_offsets.shape}"
            )
        if self.values.ndim != 1:
            raise ValueError(f"values must be 1D, got shape {self.values.shape}")
        tiles_mask = _bitmap_tiles(np.asarray(self.bitmap))
        mask_t = _unpack_bits(np.asarray(self.bitmap))
        if mask_t[self.out_features :].any() or mask_t[:, self.in_features :].any():
            raise ValueError("bitmap has bits set in the padding")
        if tiles_mask.sum() != self.nnz:
            raise ValueError(
                f"bitmap has {tiles_mask.sum()} set bits but values has {self.nnz} entries"
            )
        if not np.array_equal(np.asarray(self.tile_offsets), _quarter_offsets(tiles_mask)):
            raise ValueError("tile_offsets do not match the bitmap's popcounts")
        return self

    def mask(self) -> jax.Array:
        """bool ``[in_features, out_features]``."""
        return _unpack_bits(self.bitmap)[: self.out_features, : self.in_features].T

    def todense(self) -> jax.Array:
        """Dense ``[in_features, out_features]`` (exact round trip); differentiable in values."""
        tiles = _bitmap_tiles(self.bitmap)  # [nT, kT, 4096]
        quarters = tiles.reshape(*tiles.shape[:2], 4, QUARTER)
        rank = jnp.cumsum(quarters, axis=-1, dtype=jnp.int32) - 1  # popcount prefix
        index = (self.tile_offsets[..., None] + rank).reshape(tiles.shape)
        if self.nnz == 0:
            gathered = jnp.zeros(tiles.shape, self.values.dtype)
        else:  # Indices past a quarter's nonzeros are clipped, then masked out.
            gathered = jnp.take(self.values, jnp.clip(index, 0, self.nnz - 1), axis=0)
        dense_tiles = jnp.where(tiles, gathered, jnp.zeros((), self.values.dtype))
        n_tiles, k_tiles = tiles.shape[:2]
        dense_t = _from_tile_major(dense_tiles, n_tiles * TILE_ROWS, k_tiles * TILE_K)
        return dense_t[: self.out_features, : self.in_features].T

    def with_values(self, values) -> SparseWeight:
        """Same mask, new nonzero values (e.g. after a training step)."""
        if values.shape != self.values.shape:
            raise ValueError(f"values shape {values.shape} != {self.values.shape}")
        return dataclasses.replace(self, values=values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseShards:
    """A :class:`SparseWeight` split into ``num_shards`` along ``in`` or ``out``
    features for tensor parallelism; every leaf has a leading shard dimension.

    Shards are packed independently (values zero-padded to the largest shard's
    nnz) so each device holds a complete bitmap-format weight for its slice.
    Build with :func:`split_sparse`; shard the leading dim over the mesh axis.
    """

    stacked: SparseWeight
    in_features: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))
    split: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @property
    def nbytes(self) -> int:
        return self.stacked.nbytes

    def local(self) -> SparseWeight:
        """Inside ``shard_map``: this device's shard (leading dim of size 1)."""
        return jax.tree.map(lambda a: a[0], self.stacked)

    def _parts(self) -> list[SparseWeight]:
        return [
            jax.tree.map(lambda a, i=i: a[i], self.stacked)
            for i in range(self.stacked.values.shape[0])
        ]

    def _join(self, arrays) -> jax.Array:
        joined = jnp.concatenate(arrays, axis=0 if self.split == "in" else 1)
        return joined[: self.in_features, : self.out_features]

    def todense(self) -> jax.Array:
        return self._join([part.todense() for part in self._parts()])

    def merge(self) -> SparseWeight:
        """The whole weight as one :class:`SparseWeight` (e.g. to re-split it for
        another mesh), mask kept exactly. Not jittable."""
        return SparseWeight.from_dense(
            self.todense(), mask=self._join([part.mask() for part in self._parts()])
        )


def split_sparse(
    w: SparseWeight, num_shards: int, split: str, *, values_multiple: int = 1
) -> SparseShards:
    """Splits ``w`` into ``num_shards`` along ``"in"`` (row-parallel) or ``"out"``
    (column-parallel) features, each slice a multiple of the 64-wide tile. Not jittable.

    Each shard's values are zero-padded to a common length, rounded up to
    ``values_multiple`` (the fsdp size, so the values can be split over it)."""
    if not isinstance(w, SparseWeight):
        raise ValueError(f"split_sparse expects a SparseWeight, got {type(w).__name__}")
    check_choice("split", split, ("in", "out"))
    num_shards = check_int("num_shards", num_shards, minimum=1)
    values_multiple = check_int("values_multiple", values_multiple, minimum=1)
    dense, mask = np.asarray(w.todense()), np.asarray(w.mask())
    axis = 0 if split == "in" else 1
    size = _round_up(dense.shape[axis], 64 * num_shards)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, size - dense.shape[axis])
    parts = np.split(np.pad(dense, pad), num_shards, axis=axis)
    masks = np.split(np.pad(mask, pad), num_shards, axis=axis)  # zero values stay in it
    shards = [SparseWeight.from_dense(p, mask=m) for p, m in zip(parts, masks, strict=True)]
    max_nnz = _round_up(max(1, max(shard.nnz for shard in shards)), values_multiple)
    values = jnp.stack([jnp.pad(sh.values, (0, max_nnz - sh.nnz)) for sh in shards])
    stacked = SparseWeight(
        values=values,
        bitmap=jnp.stack([sh.bitmap for sh in shards]),
        tile_offsets=jnp.stack([sh.tile_offsets for sh in shards]),
        in_features=parts[0].shape[0],
        out_features=parts[0].shape[1],
    )
    return SparseShards(stacked, w.in_features, w.out_features, split)


def _keep_mask(scores: np.ndarray, sparsity: float, pattern: tuple[int, int] | None):
    """Per output column of ``scores [K, N]``: keep the largest scores."""
    k, n = scores.shape
    if pattern is not None:
        keep_n, group_m = pattern
        if k % group_m:
            raise ValueError(f"in_features={k} is not divisible by the {keep_n}:{group_m} group")
        groups = scores.reshape(k // group_m, group_m, n)
        order = np.argsort(-groups, axis=1, kind="stable")
        keep = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(keep, order[:, :keep_n], True, axis=1)
        return keep.reshape(k, n)
    num_keep = int(round((1.0 - sparsity) * k))
    keep = np.zeros((n, k), dtype=bool)  # one contiguous row per output column
    if num_keep:
        # A partial sort (linear time) finds each column's num_keep largest.
        top = np.argpartition(-np.ascontiguousarray(scores.T), num_keep - 1, axis=1)
        np.put_along_axis(keep, top[:, :num_keep], True, axis=1)
    return keep.T


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"n:m"`` (keep n of every m consecutive inputs) -> ``(n, m)``."""
    try:
        parsed = tuple(int(p) for p in pattern.split(":"))
        assert len(parsed) == 2 and 0 < parsed[0] <= parsed[1]
    except (ValueError, AssertionError, AttributeError):
        raise ValueError(f"pattern must look like '2:4', got {pattern!r}") from None
    return parsed


def sparsify(
    w,
    sparsity: float = 0.8,
    method: Literal["magnitude", "wanda"] = "magnitude",
    *,
    activation_norms=None,
    pattern: str | None = None,
    name: str = "w",
) -> SparseWeight:
    """Prunes ``w [in_features, out_features]`` and packs it. Not jittable (data-dependent nnz).

    ``method="magnitude"`` scores ``|W|``; ``"wanda"`` scores ``|W_kn| * ||X_k||_2``
    given ``activation_norms [in_features]`` from a calibration pass. Both
    prune per output feature. ``pattern="2:4"`` (N:M) keeps N of every M
    consecutive inputs instead of using ``sparsity``.
    """
    check_array("w", w)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"sparsify expects a 2D [in_features, out_features] weight, got {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"sparsify expects a floating-point weight, got {w.dtype}")
    if pattern is None:
        sparsity = check_float("sparsity", sparsity, minimum=0.0, maximum=1.0, open_max=True)
    check_choice("method", method, ("magnitude", "wanda"))
    # A NaN would be scored as the smallest weight and pruned, hiding the problem.
    check_finite(name, w)
    parsed = None if pattern is None else parse_pattern(pattern)
    scores = np.abs(w.astype(np.float32))
    if method == "wanda":
        if activation_norms is None:
            raise ValueError("method='wanda' needs activation_norms [in_features]")
        norms = np.asarray(activation_norms, np.float32)
        if norms.shape != (w.shape[0],):
            raise ValueError(f"activation_norms shape {norms.shape} != ({w.shape[0]},)")
        check_finite("activation_norms", norms)
        if (norms < 0).any():
            raise ValueError("activation_norms must be >= 0 (L2 norms)")
        scores = scores * norms[:, None]
    elif method != "magnitude":
        raise ValueError(f"method must be 'magnitude' or 'wanda', got {method!r}")
    pruned = np.where(_keep_mask(scores, sparsity, parsed), w, np.zeros((), w.dtype))
    return SparseWeight.from_dense(pruned)


def activation_norms(x) -> jax.Array:
    """Wanda's per-input-feature L2 norms of calibration activations ``[..., in_features]``."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.sqrt(jnp.sum(x.reshape(-1, x.shape[-1]) ** 2, axis=0))


MOSAIC_MAX_TOKENS = 256  # Beyond this the product is compute bound: dense XLA wins.


def sparse_matmul_reference(x: jax.Array, w: SparseWeight) -> jax.Array:
    """XLA path: decode to dense, then one dot with fp32 accumulation."""
    dense = w.todense().astype(x.dtype)
    return jnp.matmul(x, dense, preferred_element_type=jnp.float32).astype(x.dtype)


def mosaic_supports(x, w: SparseWeight) -> str | None:
    """Why the Mosaic kernel cannot run this product, or None."""
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return f"x dtype {x.dtype} (needs bf16/fp16)"
    if w.values.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"values dtype {w.values.dtype}"
    if w.values.ndim != 1 or w.bitmap.ndim != 3:
        return f"an unpacked weight (values {w.values.shape}, bitmap {w.bitmap.shape})"
    return None


def _mosaic_matmul(x, w, config):
    lead, k = x.shape[:-1], x.shape[-1]
    kp = w.bitmap.shape[1] * TILE_K
    x2 = jnp.pad(x.reshape(-1, k), ((0, 0), (0, kp - k)))
    y = sparse_mgpu.matmul(x2, w, config=config)
    return y[:, : w.out_features].astype(x.dtype).reshape(*lead, w.out_features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sparse_matmul(x, w, implementation, config):
    if implementation == "mosaic":
        return _mosaic_matmul(x, w, config)
    return sparse_matmul_reference(x, w)


def _fwd(x, w, implementation, config):
    return _sparse_matmul(x, w, implementation, config), (x, w)


def _bwd(implementation, config, residuals, dy):
    """dx = dy W^T; d values = (x^T dy) sampled at the mask (SDDMM); the mask
    gets no gradient. Both on XLA: training batches make these compute bound."""
    del implementation, config
    x, w = residuals
    dense, pull_values = jax.vjp(lambda v: w.with_values(v).todense(), w.values)
    dx = jnp.matmul(dy, dense.astype(dy.dtype).T, preferred_element_type=jnp.float32)
    k, n = w.shape
    dw = jnp.matmul(
        x.reshape(-1, k).T, dy.reshape(-1, n), preferred_element_type=jnp.float32
    ).astype(dense.dtype)
    (dvalues,) = pull_values(cotangent_like(dw, dense))
    no_grad = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    dw_sparse = dataclasses.replace(
        w, values=dvalues, bitmap=no_grad(w.bitmap), tile_offsets=no_grad(w.tile_offsets)
    )
    return cotangent_like(dx.astype(x.dtype), x), dw_sparse


_sparse_matmul.defvjp(_fwd, _bwd)


SELF_CHECK_TIMEOUT_S = 300.0  # compiles two kernels; PALLAX_SELF_CHECK_TIMEOUT overrides


def _self_check_products() -> str | None:
    """One small product per decode against XLA; None if both agree, else why not.

    The kernel's per-thread decode is emitted as raw MLIR that CPU tests only
    lower (interpret mode runs a jnp twin of it), so the real GPU gets one
    check before the kernel is used automatically."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((320, 192)).astype(np.float32)
    dense *= rng.random(dense.shape) < 0.3
    dense[:64, :64] = rng.standard_normal((64, 64))  # a full tile
    w = SparseWeight.from_dense(dense.astype(jnp.bfloat16))
    x = jnp.asarray(rng.standard_normal((8, 320)), jnp.bfloat16)
    expected = np.asarray(sparse_matmul_reference(x, w), np.float32)
    for decode in sparse_mgpu.DECODES:  # Both decodes, whichever density picks.
        config = sparse_mgpu.SpmmConfig(decode=decode)
        try:
            got = np.asarray(jax.jit(_mosaic_matmul, static_argnums=2)(x, w, config), np.float32)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
            return f"({decode} decode) failed its self-check ({e})"
        if not np.allclose(got, expected, rtol=2e-2, atol=2e-2):
            return f"({decode} decode) disagrees with XLA on this GPU"
    return None


def _with_deadline(check, timeout_s: float) -> str | None:
    """Runs ``check()`` in a daemon thread; a hang past ``timeout_s`` becomes a reason.

    A hung kernel cannot be cancelled from Python, but the caller stops waiting
    for it and uses XLA (the thread is a daemon, so it never blocks exit)."""
    result: list[str | None] = []

    def run():
        try:
            result.append(check())
        except BaseException as e:  # noqa: BLE001 - reported, not raised, in the caller
            result.append(f"raised {type(e).__name__}: {e}")

    thread = threading.Thread(target=run, name="pallax-sparse-self-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"did not finish its self-check within {timeout_s:g} s (hang?)"
    return result[0]


@functools.cache
def _mosaic_self_check() -> bool:
    """The first time the kernel is picked automatically: :func:`_self_check_products`
    under a deadline; any failure or hang falls back to XLA with a warning."""
    timeout = float(os.environ.get("PALLAX_SELF_CHECK_TIMEOUT", SELF_CHECK_TIMEOUT_S))
    reason = _with_deadline(_self_check_products, timeout)
    if reason is not None:
        warnings.warn(f"pallax: Mosaic sparse_matmul {reason}; using XLA", stacklevel=3)
        return False
    return True


def sparse_matmul(
    x: jax.Array,
    w: SparseWeight,
    *,
    implementation: Literal["mosaic", "xla"] | None = None,
    config: sparse_mgpu.SpmmConfig | None = None,
) -> jax.Array:
    """``x @ W`` for x ``[..., in_features]`` (bf16/fp16/fp32) -> ``[..., out_features]``,
    fp32 accumulation.

    ``implementation``: ``"mosaic"`` (the Hopper kernel; bf16/fp16 x), ``"xla"``,
    or ``None``: Mosaic on Hopper for up to ``MOSAIC_MAX_TOKENS`` tokens (the
    memory-bound regime where reading the weight compressed pays), else XLA.
    Gradients flow to ``x`` and to ``w.values`` (the mask stays fixed).
    """
    check_array("x", x)
    if not isinstance(w, SparseWeight):
        raise ValueError(f"expected a SparseWeight, got {type(w).__name__}")
    if config is not None and not isinstance(config, sparse_mgpu.SpmmConfig):
        raise ValueError(f"config must be a SpmmConfig or None, got {type(config).__name__}")
    if x.shape[-1] != w.in_features:
        raise ValueError(
            f"x {x.shape} does not match weight in_features {w.in_features} (weight {w.shape})"
        )
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    memory_bound = int(np.prod(x.shape[:-1])) <= MOSAIC_MAX_TOKENS
    chosen = choose_implementation(implementation, mosaic_supports(x, w), mosaic_pays=memory_bound)
    if implementation is None and chosen == "mosaic" and not _mosaic_self_check():
        chosen = "xla"
    if chosen == "mosaic":  # No config given: this device's tuned one, if any.
        problem = _tuning.sparse_key(
            int(np.prod(x.shape[:-1])), w.in_features, w.out_features, 1.0 - w.sparsity
        )
        config = _tuning.resolve(config, "sparse_matmul", sparse_mgpu.SpmmConfig, problem)
    return _sparse_matmul(x, w, chosen, config)
