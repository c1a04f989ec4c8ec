"""Orbax checkpoints of the train state together with the data-iterator position.

The position saved is that after the batch the step trained, not the iterator's current one:
the trainer fetches batches ahead of the step for the planner.
"""
from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp

from dip_jax.config import CheckpointConfig
from dip_jax.train.state import abstract_state


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        self.cfg = cfg
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """`data_state`: the data iterator's `get_state()` right after this step's batch."""
        if not force and step % self.cfg.every:
            return False
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reload(self) -> None:
        """Re-read the directory (after a checkpoint was moved away)."""
        self.manager.reload()

    def wait(self) -> None:
        """Block until a background save is written; raises its error if it failed."""
        self.manager.wait_until_finished()

    def restore(self, state, data_iter, step: int | None = None):
        """Restore the latest checkpoint (or `step`) into `state`'s structure and shardings, and
        move `data_iter` to the batch after the one trained last. Returns (state, step), or
        (state, None) if there is none."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return state, None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state(state)), data=ocp.args.JsonRestore()))
        data_iter.set_state(restored["data"])
        return restored["state"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
