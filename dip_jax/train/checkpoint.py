"""Orbax checkpoints of the train state together with the grain iterator position."""
from __future__ import annotations

import pathlib

import grain
import orbax.checkpoint as ocp

from dip_jax.config import CheckpointConfig
from dip_jax.train.state import abstract_state


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, force: bool = False) -> bool:
        if not force and step % self.cfg.every:
            return False
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

    def restore(self, state, data_iter):
        """Restore the latest checkpoint into `state`'s structure and shardings and into
        `data_iter` (in place). Returns (state, step), or (state, None) if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return state, None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state(state)),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        return restored["state"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
