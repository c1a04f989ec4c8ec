"""Minimal program: shard_map manual over 'pipe' only, 'tensor' left to the compiler, and a
predicated body (a while_loop of trip count 0 or 1, as the executor's ops) that only pipeline
rank 0 runs. XLA partitions the body's work over 'tensor' with collective-permutes among the
devices of every rank; rank 1 never joins them, and the program deadlocks. `manual` runs the
same program manual over both axes with the group's all-reduce written out: it completes.
"""
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "4"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

manual = sys.argv[1] == "manual"
mesh = jax.make_mesh((2, 2), ("pipe", "tensor"), axis_types=(AxisType.Auto,) * 2)
w = jax.device_put(np.ones((2, 8, 8), np.float32), NamedSharding(mesh, P("pipe", None, "tensor")))


def per_rank(w, x):
    w = w[0]

    def body(c):
        go, y = c
        z = y @ w
        z = jnp.concatenate([lax.psum(z, "tensor")] * 2) if manual else jnp.roll(z, 1)
        return go & False, jnp.tanh(z)[:8]
    _, y = lax.while_loop(lambda c: c[0], body, (lax.axis_index("pipe") == 0, x))
    return lax.ppermute(y, "pipe", [(0, 1), (1, 0)])[None]


if manual:
    f = jax.shard_map(per_rank, mesh=mesh, in_specs=(P("pipe", None, "tensor"), P()),
                      out_specs=P(("pipe", "tensor")), check_vma=False)
else:
    f = jax.shard_map(per_rank, mesh=mesh, in_specs=(P("pipe"), P()), out_specs=P("pipe"),
                      axis_names={"pipe"}, check_vma=False)
print("result", float(jax.jit(f)(w, jnp.ones((8,), jnp.float32)).sum()))
