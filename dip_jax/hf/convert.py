"""Hugging Face checkpoints <-> a dip_jax module's parameters, through its family's table.

Import checks every tensor's name and shape against config.json before reading any (headers
only), then reads tensor by tensor, or the slice of one a caller asks for (a stage's layers,
a tensor-parallel share), so a loader can fill each device's shard and nothing more.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np

from dip_jax.config import AudioConfig, LLMConfig, ModelConfig, VisionConfig
from dip_jax.hf.families import CONV1D, LINEAR, PATCH, Family, default_family, family_of
from dip_jax.hf.safetensors_io import Checkpoint, HFError, write_sharded

CONFIG_CLASSES = {"llm": LLMConfig, "vision": VisionConfig, "audio": AudioConfig}
# parameters no checkpoint holds: they start from their random init (an encoder's projector)
FRESH = ("projector",)
# tensors a checkpoint may hold that are not parameters (older rotary caches)
_IGNORED = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def leaf_keys(path) -> tuple[str, ...]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return tuple(keys[:-1] if keys and keys[-1] == "value" else keys)


def open_checkpoint(directory, module: str | None = None) -> tuple[Checkpoint, Family]:
    ckpt = Checkpoint(directory)
    family = family_of(ckpt.config, str(ckpt.dir / "config.json"))
    if module is not None and family.module != module:
        raise HFError(f"{ckpt.dir / 'config.json'}: model_type {family.model_type!r} initialises a "
                      f"{family.module} module, not model.{module}")
    return ckpt, family


def module_config(base, ckpt: Checkpoint, family: Family, prefix: str):
    """`base` with the architecture keys of the checkpoint's config.json. A key the config set
    away from its default to another value than the checkpoint's is a conflict."""
    arch = family.arch(ckpt.config, str(ckpt.dir / "config.json"))
    if getattr(base, "feature_layer", 0):
        n, k = arch["layers"], base.feature_layer
        arch["layers"] = n + 1 + k if k < 0 else k          # hidden_states[k] follows k layers
        arch["head_norm"] = False
        if not 0 < arch["layers"] <= n:
            raise HFError(f"{prefix}.feature_layer={k} selects no layer of the {n} in {ckpt.dir / 'config.json'}")
    default = type(base)()
    for key, value in arch.items():
        mine = getattr(base, key)
        if mine != default.__dict__[key] and mine != value:
            raise HFError(f"{prefix}.{key}={mine!r} conflicts with {ckpt.dir / 'config.json'}, which gives {value!r}")
    cfg = dataclasses.replace(base, **arch)
    cfg.check(prefix)
    return cfg


def resolve_model(model: ModelConfig) -> ModelConfig:
    """The model config with every `init_from` module's architecture read from its checkpoint."""
    subs = {}
    for name in model.modules:
        sub = model.module(name)
        if getattr(sub, "init_from", ""):
            ckpt, family = open_checkpoint(sub.init_from, name)
            subs[name] = module_config(sub, ckpt, family, f"model.{name}")
    return model.with_modules(subs) if subs else model


def _expected(kind: str, shape: tuple[int, ...], cfg) -> tuple[int, ...]:
    if kind == PATCH:
        return (shape[1], cfg.channels, cfg.patch_size, cfg.patch_size)
    if kind == CONV1D:
        return (shape[2], shape[1], shape[0])
    return tuple(reversed(shape)) if kind == LINEAR else tuple(shape)


def _prefixed(ckpt: Checkpoint, family: Family, table: dict) -> dict:
    """The table with the prefix under which this checkpoint keeps the family's tensors."""
    probe = next(iter(table.values()))[0].format(i=0)
    names = ckpt.names()
    prefix = next((p for p in family.prefixes if p + probe in names), "")
    return {rel: (prefix + name, kind) for rel, (name, kind) in table.items()}


def check_tensors(ckpt: Checkpoint, family: Family, cfg, shapes) -> dict:
    """Every parameter's tensor is there with the shape config.json implies, and the checkpoint
    holds nothing else. `shapes`: the module's parameter tree (ShapeDtypeStructs or arrays).
    Returns the table {parameter path: (name, kind)}."""
    table = _prefixed(ckpt, family, family.names(cfg))
    seen = set()
    for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        rel = leaf_keys(path)
        if rel[0] in FRESH:
            continue
        if rel not in table:
            raise HFError(f"{ckpt.dir}: no tensor of {family.model_type} maps to parameter {'/'.join(rel)}")
        name, kind = table[rel]
        if rel[0] == "blocks":
            for i in range(x.shape[0]):
                ckpt.check_shape(name.format(i=i), _expected(kind, x.shape[1:], cfg))
                seen.add(name.format(i=i))
        else:
            ckpt.check_shape(name, _expected(kind, x.shape, cfg))
            seen.add(name)
    extra = sorted(n for n in ckpt.names() - seen if not n.endswith(_IGNORED) and not family.unused(n, cfg))
    if extra:
        raise HFError(f"{ckpt.dir / ckpt.files[extra[0]]}: tensor {extra[0]} is not part of the model "
                      f"config.json describes ({len(extra)} such tensors)")
    return table


def read_tensor(ckpt: Checkpoint, name: str, kind: str, index: tuple = ()) -> np.ndarray:
    """Tensor `name` in the module's orientation, restricted to `index` (slices of its axes)."""
    index = tuple(index) + (slice(None),) * (2 - len(index)) if kind == LINEAR else tuple(index)
    if kind == LINEAR:
        cols, rows = index
        return ckpt.read(name, rows=rows)[:, cols].T
    if kind == CONV1D:
        return ckpt.read(name).transpose(2, 1, 0)[index]
    if kind == PATCH:                        # [D, C, p, p] -> [(p, p, C), D], patchify's order
        w = ckpt.read(name)
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])[index]
    if not index:
        return ckpt.read(name)
    return ckpt.read(name, rows=index[0])[(slice(None),) + index[1:]]


def read_leaf(ckpt: Checkpoint, entry: tuple[str, str], rel: tuple[str, ...], layers=None, index: tuple = ()):
    """One parameter: a block parameter stacked over `layers` (layer indices), else the tensor."""
    name, kind = entry
    if rel[0] != "blocks":
        return read_tensor(ckpt, name, kind, index)
    out = None
    for j, i in enumerate(layers):          # into one buffer: no list of layers beside the stack
        a = read_tensor(ckpt, name.format(i=int(i)), kind, index)
        if out is None:
            out = np.empty((len(layers),) + a.shape, np.float32)
        out[j] = a
    return out


def load_params(ckpt: Checkpoint, family: Family, cfg, shapes, put=np.asarray):
    """The module's parameters (model layout [L, ...]) from the checkpoint, each leaf passed
    through `put` as soon as it is read (e.g. onto a device), so that only one leaf's host copy
    is alive at a time."""
    table = check_tensors(ckpt, family, cfg, shapes)

    def leaf(path, x):
        rel = leaf_keys(path)
        if rel not in table:                 # FRESH: left to the caller (zeros here)
            return put(np.zeros(x.shape, np.float32))
        return put(read_leaf(ckpt, table[rel], rel, range(x.shape[0]) if rel[0] == "blocks" else None))
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def export_tensors(family: Family, cfg, params):
    """(name, array) of every checkpoint tensor, lazily, from the module's parameters (model
    layout)."""
    table = family.names(cfg)
    flat = {leaf_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = set(flat) ^ set(table)
    if missing:
        raise HFError(f"model.{family.module}: parameters and the {family.model_type} table differ at "
                      f"{'/'.join(sorted(missing)[0])}")
    for rel, (name, kind) in table.items():
        a = np.asarray(flat[rel], np.float32)
        conv = (lambda t: t.T) if kind == LINEAR else (lambda t: t)
        if rel[0] == "blocks":
            for i in range(a.shape[0]):
                yield name.format(i=i), conv(a[i])
        else:
            yield name, conv(a)


def export_directory(module: str, cfg, params, out, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
    """Write a Hugging Face directory: config.json (the source checkpoint's, with this module's
    architecture), sharded safetensors + index, and the source's tokenizer files."""
    out = pathlib.Path(out)
    source = pathlib.Path(cfg.init_from) if getattr(cfg, "init_from", "") else None
    base = json.loads((source / "config.json").read_text()) if source and (source / "config.json").is_file() else {}
    family = family_of(base, str(source / "config.json")) if base else default_family(module, cfg)
    if family.to_json is None:
        raise HFError(f"model.{module}: export of {family.model_type} is not supported (backbones only)")
    config = family.to_json(cfg, base)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    write_sharded(export_tensors(family, cfg, params), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    return out
