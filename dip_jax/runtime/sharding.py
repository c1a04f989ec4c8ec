"""The sharding rules: logical axis names of parameters, activations and tables -> mesh axes.

Every PartitionSpec of the runtime and the trainer is derived from `RULES`, so that adding a
mesh axis is a change of this table and of the logical names arrays carry, not of the code
that places them. A logical name absent from the table is replicated.

Parameters get their logical names from `PARAM_AXES`, matched on the end of a leaf's path. A
path rule (rather than partitioning metadata on the NNX variables) names a parameter, its
gradient and every optimizer moment of it alike, in the model and in any stage layout, and
keeps the models free of anything but their math.
"""
from __future__ import annotations

import math

from jax.sharding import NamedSharding, PartitionSpec

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("stage", "pipe"),               # leading axis of a stage stack [P, K, Lc, ...]; rank axis of tables
    ("replica", "data"),             # leading axis of per-replica batches and tables
    ("batch", ("data", "pipe")),     # microbatch axis of the unpipelined reference step
    ("heads", "tensor"),             # attention heads: q/k/v column-parallel, output row-parallel
    ("mlp", "tensor"),               # MLP hidden units: gate/up column-parallel, down row-parallel
    ("zero", "data"),                # the axis an optimizer moment is split along over the replicas (ZeRO-1)
)
_RULES = dict(RULES)

_ATTN, _QKV = ("attn", "cross"), ("q", "k", "v")
# (path suffix, each entry the keys it accepts) -> logical names of the leaf's trailing axes.
# Only transformer blocks are split over 'tensor'; embeddings, LM head, projectors, norms and
# the DiT's modulation stay replicated (small next to the blocks, and used by one rank each).
PARAM_AXES: tuple[tuple[tuple[tuple[str, ...], ...], tuple[str | None, ...]], ...] = (
    ((_ATTN, _QKV, ("kernel",)), (None, "heads")),
    ((_ATTN, ("o",), ("kernel",)), ("heads", None)),
    ((("mlp",), ("gate", "up"), ("kernel",)), (None, "mlp")),
    ((("mlp",), ("down",), ("kernel",)), ("mlp", None)),
    # a column-parallel linear's bias is split with its outputs; a row-parallel one's stays
    # whole (runtime/tensor.py adds it once, after the sum over the group)
    ((_ATTN, _QKV, ("bias",)), ("heads",)),
    ((("mlp",), ("gate", "up"), ("bias",)), ("mlp",)),
)


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
TENSOR = mesh_axis("heads")

# logical names of the executor's per-step arrays
TABLE = ("replica", None, "stage", None)     # ops / recv: [data, T, P, fields]
REPLICA_BATCH = ("replica",)                 # per-replica batch arrays [data, M/data, ...]
SCALAR = ()


def _keys(path) -> list[str]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return keys[:-1] if keys and keys[-1] == "value" else keys


def param_axes(path) -> tuple[str | None, ...]:
    """Logical names of a parameter leaf's trailing axes (() when no rule names them)."""
    keys = _keys(path)
    for pattern, names in PARAM_AXES:
        n = len(pattern)
        if len(keys) >= n and all(k in accepted for k, accepted in zip(keys[-n:], pattern)):
            return names
    return ()


def tensor_role(module_path) -> str | None:
    """'column' or 'row' for a linear (by its module path) whose kernel the rules split over
    'tensor' along its output or its input axis; None otherwise."""
    names = param_axes(tuple(module_path) + ("kernel",))
    if len(names) != 2 or names[0] == names[1]:
        return None
    split = [n is not None and mesh_axis(n) == "tensor" for n in names]
    return "row" if split[0] else "column" if split[1] else None


def state_leaf_names(path, ndim: int, modules, staged: bool) -> tuple[str | None, ...]:
    """Logical names of every axis of one train-state leaf (a parameter, its gradient or an
    optimizer moment): the block stacks of a staged state lead with their stage axis
    [P, K, Lc, ...] (the model layout with its layer axis [L, ...]); the trailing axes are
    named by `PARAM_AXES`. Non-block parameters are replicated (small, and used on several
    ranks)."""
    from dip_jax.runtime.stages import block_module
    tail = param_axes(path)
    if len(tail) > ndim:
        tail = ()
    lead: tuple[str | None, ...] = ()
    if staged and block_module(path, modules) is not None:
        lead = ("stage",)
    lead = lead + (None,) * (ndim - len(tail) - len(lead))
    return lead + tail


def _is_moment(path) -> bool:
    return "opt_state" in _keys(path)


def leaf_spec(mesh, path, shape, modules, staged: bool, zero: bool = False) -> PartitionSpec:
    """The PartitionSpec of one train-state leaf on `mesh`. A rule whose mesh axis does not
    divide the axis it names is not applied (that axis stays replicated), nor one whose mesh
    axis has size 1 except the stage axis (leaves then differ in sharding only where their
    placement does: each distinct sharding costs a collective in the global norm). With `zero`, an
    optimizer moment (a leaf under 'opt_state') is also split over 'data', along its largest
    axis that is not split yet and that the data size divides."""
    sizes = dict(mesh.shape)
    entries = []
    for n, dim in zip(state_leaf_names(path, len(shape), modules, staged), shape):
        axis = None if n is None else mesh_axis(n)
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        ok = bool(axes) and all(a in sizes for a in axes) and dim % math.prod(sizes[a] for a in axes) == 0 \
            and (n == "stage" or math.prod(sizes[a] for a in axes) > 1)
        entries.append(axis if ok else None)
    data_axis = mesh_axis("zero")
    if zero and _is_moment(path) and sizes.get(data_axis, 1) > 1:
        free = [i for i, (e, d) in enumerate(zip(entries, shape)) if e is None and d % sizes[data_axis] == 0]
        if free:
            entries[max(free, key=lambda i: shape[i])] = data_axis
    return PartitionSpec(*entries)




def state_specs(mesh, tree, modules, staged: bool, zero: bool = False):
    """PartitionSpec of every leaf of a train-state tree (see `leaf_spec`)."""
    import jax
    return jax.tree_util.tree_map_with_path(
        lambda p, x: leaf_spec(mesh, p, x.shape, modules, staged, zero), tree)


def state_shardings(mesh, tree, modules, staged: bool, zero: bool = False):
    """NamedSharding of every leaf of a train-state tree (params, gradients, optimizer state,
    or the whole {params, opt_state, step, rng}) in the stage or the model layout; `zero`
    splits the optimizer moments over 'data' as well."""
    import jax
    return jax.tree.map(lambda ps: NamedSharding(mesh, ps), state_specs(mesh, tree, modules, staged, zero),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
