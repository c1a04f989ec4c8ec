"""The sharding rules: logical axis names of parameters, activations and tables -> mesh axes.

Every PartitionSpec of the runtime and the trainer is derived from `RULES`, so that adding a
mesh axis ('tensor', FSDP over 'data') is a change of this table and of the logical names
arrays carry, not of the code that places them. A logical name absent from the table is
replicated.
"""
from __future__ import annotations

from jax.sharding import NamedSharding, PartitionSpec

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("stage", "pipe"),               # leading axis of a stage stack [P, K, Lc, ...]; rank axis of tables
    ("replica", "data"),             # leading axis of per-replica batches and tables
    ("batch", ("data", "pipe")),     # microbatch axis of the unpipelined reference step
)
_RULES = dict(RULES)


def mesh_axis(name: str):
    """The mesh axis (or axes) a logical name maps to; None = replicated."""
    return _RULES.get(name)


def spec(*names: str | None) -> PartitionSpec:
    """PartitionSpec of an array whose axes carry these logical names (None = replicated axis)."""
    return PartitionSpec(*(None if n is None else mesh_axis(n) for n in names))


def named(mesh, *names: str | None) -> NamedSharding:
    return NamedSharding(mesh, spec(*names))


# mesh axes the executor's collectives run over, read from the table as everything else
STAGE = mesh_axis("stage")
REPLICA = mesh_axis("replica")

# logical names of the executor's per-step arrays
TABLE = ("replica", None, "stage", None)     # ops / recv: [data, T, P, fields]
REPLICA_BATCH = ("replica",)                 # per-replica batch arrays [data, M/data, ...]
SCALAR = ()


def state_leaf_names(path, modules, staged: bool) -> tuple[str | None, ...]:
    """Logical names of one train-state leaf (a parameter or an optimizer moment): the block
    stacks of a staged state are split over stages, everything else is replicated (see
    docs: non-block parameters are small and used on several ranks)."""
    from dip_jax.runtime.stages import block_module
    if staged and block_module(path, modules) is not None:
        return ("stage",)
    return ()


def state_shardings(mesh, tree, modules, staged: bool):
    """NamedSharding of every leaf of a train-state tree (params, gradients, optimizer state,
    or the whole {params, opt_state, step, rng}) in the stage or the model layout."""
    import jax
    return jax.tree_util.tree_map_with_path(lambda p, _: named(mesh, *state_leaf_names(p, modules, staged)), tree)
