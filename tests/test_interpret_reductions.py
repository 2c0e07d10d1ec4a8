"""pallax.testing's TMA reductions in GPU interpret mode (jax 0.11.2 has none).

Several CTAs reduce into one GMEM tile, which only works if every update is
applied whole; the result must equal numpy's reduction of all of them with the
tile's initial value. Each case also lowers for CUDA (the same kernel runs on a
GPU as ``cp.reduce.async.bulk``).
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallax import testing


def _reduce_into(x, acc, reduction_op, plain_ctas=()):
    """``acc[8:72] <- reduce(acc[8:72], x[0], ..., x[n-1])``, one CTA per ``x[i]``, via
    TMA; the CTAs in ``plain_ctas`` store ``x[i]`` plainly instead (racing the rest)."""

    def body(x_ref, acc_ref, smem, barrier):
        i = lax.axis_index("i")
        plgpu.copy_gmem_to_smem(x_ref.at[i], smem, barrier)
        plgpu.barrier_wait(barrier)
        window = acc_ref.at[pl.ds(8, 64)]
        if not plain_ctas:
            plgpu.copy_smem_to_gmem(smem, window, reduction_op=reduction_op)
        else:
            plain = functools.reduce(jnp.logical_or, [i == c for c in plain_ctas])
            pl.when(plain)(lambda: plgpu.copy_smem_to_gmem(smem, window))
            pl.when(jnp.logical_not(plain))(
                lambda: plgpu.copy_smem_to_gmem(smem, window, reduction_op=reduction_op)
            )
        plgpu.wait_smem_to_gmem(0)

    def run(refs):
        x_ref, acc_ref = refs
        plgpu.kernel(
            body,
            out_type=(),
            scratch_types=(plgpu.SMEM(x.shape[1:], x.dtype), plgpu.Barrier()),
            grid=(x.shape[0],),
            grid_names=("i",),
        )(x_ref, acc_ref)

    return pl.run_state(run)((x, acc))[1]


@pytest.mark.parametrize(
    "reduction_op, numpy_op, dtype",
    # Element types TMA reduces with these ops (min/max: 16-bit floats only).
    [
        ("add", np.add, jnp.float32),
        ("min", np.minimum, jnp.bfloat16),
        ("max", np.maximum, jnp.float16),
    ],
)
def test_concurrent_ctas_reduce_into_one_tile(reduction_op, numpy_op, dtype):
    assert testing.tma_reductions_simulated()
    x = (100 * jax.random.normal(jax.random.key(0), (6, 64, 128))).astype(dtype)
    acc = (100 * jax.random.normal(jax.random.key(1), (80, 128))).astype(dtype)
    fn = jax.jit(lambda x, acc: _reduce_into(x, acc, reduction_op))
    with testing.gpu_interpret():
        out = np.asarray(fn(x, acc))
    expected = np.asarray(acc).copy()
    expected[8:72] = numpy_op.reduce(np.concatenate([expected[None, 8:72], np.asarray(x)]), axis=0)
    np.testing.assert_allclose(
        out.astype(np.float32), expected.astype(np.float32), rtol=1e-6, atol=1e-4
    )
    # Rows outside the reduced window are untouched.
    np.testing.assert_array_equal(out[:8], np.asarray(acc)[:8])
    assert "mosaic_gpu" in testing.lower_for_cuda(fn, x, acc).mlir_module()


def test_unsimulated_reduction_is_named():
    x = jnp.ones((1, 64, 128), jnp.int32)
    acc = jnp.zeros((80, 128), jnp.int32)
    with testing.gpu_interpret(), pytest.raises(Exception, match="reduction_op='xor'"):
        jax.block_until_ready(jax.jit(lambda x, a: _reduce_into(x, a, "xor"))(x, acc))


@pytest.mark.parametrize("plain_ctas, racy", [((), False), ((1,), True)])
def test_race_detection_knows_reductions_are_atomic(plain_ctas, racy):
    """Reductions into one tile from unsynchronised CTAs are no race (split-K
    relies on it); a plain store into the tile alongside them is."""
    x = jax.random.normal(jax.random.key(2), (3, 64, 128), jnp.float32)
    acc = jnp.zeros((80, 128), jnp.float32)
    fn = jax.jit(functools.partial(_reduce_into, reduction_op="add", plain_ctas=plain_ctas))
    with testing.gpu_interpret(detect_races=True):
        out = np.asarray(fn(x, acc))
    assert testing.races_detected() == racy
    if not racy:
        np.testing.assert_allclose(out[8:72], np.asarray(x).sum(0), rtol=1e-6, atol=1e-5)
