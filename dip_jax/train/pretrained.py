"""Modules that start from a Hugging Face checkpoint (`model.<module>.init_from`): their
architecture resolved from its config.json, their parameters read straight into the run's
layout and shardings.

Each device's shard is read from the checkpoint as `jax.make_array_from_callback` asks for it:
a stage stack [P, K, Lc, ...] reads only the layers of that device's stage and, for a tensor-
parallel share, only its rows or columns (hf/ reads tensor slices), so a process reads the
tensors of its own shards and no host holds the whole checkpoint.
"""
from __future__ import annotations

import jax
import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.hf.convert import check_tensors, leaf_keys, open_checkpoint, read_leaf, resolve_model
from dip_jax.runtime.stages import Layouts


def resolve(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every init_from module's architecture keys read from its checkpoint."""
    model = resolve_model(cfg.model)
    return cfg if model is cfg.model else cfg.replace(model=model)


class Loader:
    """One module's checkpoint, checked against the module's parameter shapes."""

    def __init__(self, cfg: TrainConfig, module: str, shapes):
        sub = cfg.model.module(module)
        self.module = module
        self.ckpt, family = open_checkpoint(sub.init_from, module)
        self.table = check_tensors(self.ckpt, family, sub, shapes)

    def array(self, rel: tuple[str, ...], shape, sharding, layout) -> jax.Array:
        entry = self.table[rel]
        cache: dict = {}

        def read(index):
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in cache:
                cache[key] = self._read(entry, rel, tuple(index), shape, layout)
            return cache[key]
        return jax.make_array_from_callback(shape, sharding, read)

    def _read(self, entry, rel, index, shape, layout):
        if rel[0] != "blocks":
            return read_leaf(self.ckpt, entry, rel, index=index)
        if layout is None:                                   # [L, ...]
            layers = np.arange(shape[0])[index[0]]
            return read_leaf(self.ckpt, entry, rel, layers, index[1:])
        idx, valid = layout.index()                          # [P, K, Lc, ...]; padding repeats layer 0
        layers = np.where(valid, idx, 0)[index[:3]]
        flat = read_leaf(self.ckpt, entry, rel, layers.reshape(-1), index[3:])
        return flat.reshape(layers.shape + flat.shape[1:])


def loaders(cfg: TrainConfig, param_shapes, layouts: Layouts) -> dict[str, Loader]:
    """A Loader per init_from module; `param_shapes` in `layouts` (its block stacks checked in
    the model layout)."""
    out = {}
    for name in cfg.model.modules:
        if getattr(cfg.model.module(name), "init_from", ""):
            shapes = param_shapes[name]
            if layouts.get(name) is not None:
                from dip_jax.runtime.stages import relayout
                whole = jax.eval_shape(lambda t: relayout(t, layouts, {m: None for m in layouts}), param_shapes)
                shapes = whole[name]
            out[name] = Loader(cfg, name, shapes)
    return out


def owner(path, found: dict) -> tuple[str, tuple[str, ...]] | None:
    """(module, path inside it) when a parameter leaf is read from a checkpoint (a pretrained
    module's fresh parts, e.g. its projector, keep their random init)."""
    keys = leaf_keys(path)
    return (keys[0], keys[1:]) if keys and keys[0] in found and keys[1:] in found[keys[0]].table else None
