"""The global norm of a sharded train-state tree with one all-reduce per sharding pattern.

`optax.tree.norm` under jit reduces each leaf separately; for leaves split over the stages XLA
then all-reduces every leaf's partial sum, and gloo runs those operand by operand (~3 ms each
between two processes; a step takes four norms: gradient clipping, two non-finite checks and the
logged gradient norm). Here each rank sums its own shards, the partial sums of leaves with the
same sharding are added first, and one psum per sharding pattern finishes the job.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dip_jax.runtime.sharding import state_specs


def _axes(ps) -> tuple[str, ...]:
    out = []
    for entry in ps:
        if entry is None:
            continue
        out += list(entry) if isinstance(entry, tuple) else [entry]
    return tuple(sorted(set(out)))


def sharded_global_norm(mesh, modules, staged: bool):
    """norm(tree) for trees shaped like the train state's params (gradients, updates)."""
    def specs(tree):
        return state_specs(mesh, tree, modules, staged)

    def norm(tree):
        ps = specs(tree)
        leaves = jax.tree.leaves(tree)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(jax.tree.leaves(ps, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
            groups.setdefault(_axes(s), []).append(i)
        if all(not axes for axes in groups):          # nothing sharded: no collective needed
            return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))

        def local(*xs):
            total = jnp.zeros((), jnp.float32)
            for axes, idx in groups.items():
                part = sum(jnp.sum(jnp.square(xs[i].astype(jnp.float32))) for i in idx)
                total = total + (lax.psum(part, axes) if axes else part)
            return jnp.sqrt(total)
        flat_specs = jax.tree.leaves(ps, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        return jax.shard_map(local, mesh=mesh, in_specs=tuple(flat_specs), out_specs=jax.sharding.PartitionSpec(),
                             check_vma=False)(*leaves)
    return norm
