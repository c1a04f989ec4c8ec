"""Train state: a plain pytree {params, opt_state, step, rng} (orbax saves it as is).

A pipelined run keeps its block parameters and their optimizer moments in the stage layout
[P, K, Lc, ...], split over the pipeline stages (runtime/stages.py, runtime/sharding.py); the
reference step keeps the model layout, replicated. Either state is created directly in its
layout and shardings (parameters initialised on the host and cut into shards, optimizer state
created sharded), so no device ever holds the whole model unless its layout says so.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dip_jax.config import TrainConfig
from dip_jax.models.lmm import build_model
from dip_jax.runtime.sharding import state_shardings
from dip_jax.runtime.stages import Layouts, relayout
from dip_jax.train import pretrained
from dip_jax.train.optim import build_optimizer


def init_state(cfg: TrainConfig):
    """Returns (graphdef, state, tx): model layout, on the default device. The model's params
    are an nnx.State pytree."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    graphdef, params = nnx.split(model)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    return graphdef, _state(params, tx, cfg.train.seed), tx


def _state(params, tx, seed: int) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def abstract_model(cfg: TrainConfig):
    """(graphdef, model with ShapeDtypeStruct leaves): the structure, nothing allocated."""
    model = nnx.eval_shape(lambda: build_model(cfg.model, seed=cfg.train.seed))
    return nnx.graphdef(model), model


def model_layouts(cfg: TrainConfig) -> Layouts:
    return {m: None for m in cfg.model.modules}


def _initial_params(cfg: TrainConfig, layouts: Layouts):
    return relayout(nnx.state(build_model(cfg.model, seed=cfg.train.seed)), model_layouts(cfg), layouts)


def state_shapes(cfg: TrainConfig, tx, mesh, layouts: Layouts) -> dict:
    """The train state in `layouts` as ShapeDtypeStructs with their shardings (nothing allocated)."""
    staged = any(l is not None for l in layouts.values())
    shapes = jax.eval_shape(lambda: _state(_initial_params(cfg, layouts), tx, cfg.train.seed))
    # ZeRO-1 splits a pipelined state's moments; the reference step's state stays whole (replicated)
    zero = staged and cfg.optim.shard_state_over_data
    shardings = state_shardings(mesh, shapes, tuple(layouts), staged, zero)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def create_state(cfg: TrainConfig, tx, mesh, layouts: Layouts) -> dict:
    """The initial train state in `layouts` (per module: a StageLayout, or None for the model
    layout), each device receiving only the shards its sharding names.

    The parameters are initialised on the host (host memory is where a model larger than one
    accelerator fits) and cut into shards from there; the optimizer state is created on the
    devices, already sharded. Every process computes the same host values (same seed)."""
    shapes = state_shapes(cfg, tx, mesh, layouts)
    shardings = jax.tree.map(lambda x: x.sharding, shapes)
    # modules with init_from are read from their checkpoint into their shards; the others are
    # initialised as always (the pretrained ones' random init is dead code to the compiler)
    found = pretrained.loaders(cfg, shapes["params"], layouts)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes["params"])
    owners = [pretrained.owner(path, found) for path, _ in flat]
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        host = jax.jit(lambda: [None if o else a
                                for o, a in zip(owners, jax.tree.leaves(_initial_params(cfg, layouts)))])()
    params = jax.tree.unflatten(tree, [
        found[o[0]].array(o[1], x.shape, x.sharding, layouts.get(o[0])) if o else _from_host(np.asarray(a), x.sharding)
        for o, a, (_, x) in zip(owners, host, flat)])
    rest = jax.jit(lambda p: {k: v for k, v in _state(p, tx, cfg.train.seed).items() if k != "params"},
                   out_shardings={k: v for k, v in shardings.items() if k != "params"})(params)
    return {"params": params, **rest}


def _from_host(a: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def abstract_state(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def state_bytes(state: dict, layouts: Layouts) -> tuple[int, int]:
    """(logical bytes of parameters + optimizer state, the most bytes of them one device holds,
    summed over the shards that live on it). `state`: live arrays, or ShapeDtypeStructs with
    shardings (then every device of each sharding is counted)."""
    tree = {"params": state["params"], "opt_state": state["opt_state"]}
    logical = jax.eval_shape(lambda t: relayout(t, layouts, {m: None for m in layouts}), tree)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(logical))
    return total, bytes_per_device(tree)


def bytes_per_device(tree) -> int:
    """The most bytes of `tree` one device holds, summed over the shards that live on it.
    Leaves: live arrays (their addressable shards), or ShapeDtypeStructs with shardings (every
    device of each sharding is counted)."""
    per_device: collections.Counter = collections.Counter()
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            for shard in x.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
        else:
            nbytes = int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
            for device in x.sharding.device_set:
                per_device[device] += nbytes
    return max(per_device.values(), default=0)
