"""A module of a run's checkpoint as a Hugging Face directory (`python -m dip_jax.hf export`).

The run's config.json (written by the trainer, architecture keys already resolved from any
init_from checkpoint) gives the module's config; the orbax checkpoint is read on this host's
CPU whatever mesh wrote it, and the module's block stacks are taken back from their stage
layout to the model layout before hf/ writes them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from dip_jax.config import ConfigError
from dip_jax.hf.convert import CONFIG_CLASSES, export_directory
from dip_jax.runtime.stages import layouts_from_json, unstack_leaf


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def module_config(saved: dict, module: str):
    """The module's config from a run's config.json."""
    entry = saved.get("model", {}).get(module)
    if not entry:
        raise ConfigError(f"model.{module}: the run has no module {module!r}")
    cls = CONFIG_CLASSES.get(module)
    if cls is None:
        raise ConfigError(f"model.{module}: no Hugging Face family exports this module")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in entry.items() if k in fields})


def read_params(ckpt_dir: pathlib.Path, module: str, step: int | None):
    """(step, the module's parameters in the model layout, as numpy)."""
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{ckpt_dir}: no checkpoints")
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "layout": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(ckpt_dir, item_names=tuple(handlers), item_handlers=handlers)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise ConfigError(f"{ckpt_dir}: no checkpoint of step {step} (have {manager.all_steps()})")
    layouts = layouts_from_json(manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"])
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    meta = manager.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), meta)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    params = jax.tree.map(np.asarray, state["params"][module])
    layout = layouts.get(module)
    if layout is not None:
        params = dict(params)
        params["blocks"] = jax.tree.map(lambda a: unstack_leaf(a, layout), params["blocks"])
    return step, params


def export_run(workdir, module: str, out, step: int | None = None, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not a run directory (no config.json)")
    cfg = module_config(json.loads(cfg_path.read_text()), module)
    _, params = read_params(workdir / "checkpoints", module, step)
    return export_directory(module, cfg, params, out, max_shard_bytes)
