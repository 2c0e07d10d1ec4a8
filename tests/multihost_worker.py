"""One process of the 2-process CPU run in test_sharding.py (not a test by itself).

Usage: python multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sharded_step import inputs, loss_fn  # noqa: E402

from pallax import sharding as ps  # noqa: E402


def main():
    coordinator, num_processes, process_id, out_path = sys.argv[1:5]
    assert ps.initialize_distributed(coordinator, int(num_processes), int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = ps.make_mesh(data=2, tensor=2)
    # The process boundary must fall on the data axis, tensor stays local.
    grid = np.vectorize(lambda d: d.process_index)(mesh.devices)
    assert (grid.reshape(2, 2) == np.array([[0, 0], [1, 1]])).all(), grid
    params, x, names = inputs()
    with jax.set_mesh(mesh):
        shardings = ps.param_shardings(names, mesh)

        def global_array(value, sharding):
            return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

        params = jax.tree.map(global_array, params, shardings)
        x = global_array(x, ps.named_sharding(mesh, ("batch", "length", "act_embed")))
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, x)
        grads = multihost_utils.process_allgather(grads, tiled=True)
    result = {"loss": float(loss), "grads": jax.tree.map(lambda g: np.asarray(g).tolist(), grads)}
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
