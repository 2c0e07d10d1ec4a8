import os

# Tests run on the CPU (CI has no GPU); Mosaic kernels go through GPU interpret mode.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests; single-device tests use device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Fuzz budgets (tests/test_fuzz.py). "ci", the default, is small and derandomized so
# the suite stays fast and reproducible; `pytest --hypothesis-profile=long` (or
# HYPOTHESIS_PROFILE=long) searches 25x longer with fresh random examples.
_FUZZ_COMMON = dict(
    deadline=None,  # each new shape compiles: seconds, not milliseconds
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=6, derandomize=True, database=None, **_FUZZ_COMMON)
settings.register_profile("long", max_examples=150, **_FUZZ_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    do = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), dtype)
    return q, k, v, do
