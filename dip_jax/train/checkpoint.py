"""Orbax checkpoints of the train state together with the data-iterator position.

The position saved is that after the batch the step trained, not the iterator's current one:
the trainer fetches batches ahead of the step for the planner.

The state is saved as it lives, sharded (each process writes the shards it holds), with its
layout beside it (per module: the stage layout [P, K, Lc, ...], or the model layout). A
checkpoint restores under any mesh and scheduler: when the saved layout differs from the
run's, the saved arrays are read in their own layout, split over the stages where their
stage count allows it, and restacked on device into the run's layout.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from dip_jax.config import CheckpointConfig
from dip_jax.runtime.sharding import STAGE, named
from dip_jax.runtime.stages import Layouts, block_module, layouts_from_json, layouts_to_json, relayout
from dip_jax.train.state import abstract_state


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig, layouts: Layouts, mesh):
        """`layouts`: the layout of the states this run saves and restores into."""
        self.cfg, self.layouts, self.mesh = cfg, layouts, mesh
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
            item_names=("state", "data", "layout"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """`data_state`: the data iterator's `get_state()` right after this step's batch (the
        trainer's adds its data counts: `pipeline.TrainData.with_counts`)."""
        if not force and step % self.cfg.every:
            return False
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            layout=ocp.args.JsonSave(layouts_to_json(self.layouts))), force=True)

    def saved_layouts(self, step: int) -> Layouts:
        """The layout a checkpoint was written in (checkpoints without one hold the model layout)."""
        if not (self.directory / str(step) / "layout").exists():
            return {m: None for m in self.layouts}
        saved = self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
        return layouts_from_json(saved)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reload(self) -> None:
        """Re-read the directory (after a checkpoint was moved away)."""
        self.manager.reload()

    def wait(self) -> None:
        """Block until a background save is written; raises its error if it failed."""
        self.manager.wait_until_finished()

    def restore(self, state, data_iter, step: int | None = None):
        """Restore the latest checkpoint (or `step`) into `state`'s layout and shardings, and
        move `data_iter` to the batch after the one trained last. Returns (state, step), or
        (state, None) if there is none."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return state, None
        saved = self.saved_layouts(step)
        same = saved == self.layouts
        target = abstract_state(state) if same else self._read_target(state, saved)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        data_iter.set_state(restored["data"])
        if same:
            return restored["state"], step
        shardings = jax.tree.map(lambda x: x.sharding, state)
        return jax.jit(lambda t: relayout(t, saved, self.layouts), out_shardings=shardings)(restored["state"]), step

    def _read_target(self, state, saved: Layouts):
        """The saved arrays' shapes; stage stacks split over this mesh's stages when their stage
        count is a multiple of it, else read whole (restacking then needs them on every device)."""
        shapes = jax.eval_shape(lambda t: relayout(t, self.layouts, saved), state)
        stages = self.mesh.shape[STAGE]

        def one(path, x):
            m = block_module(path, saved)
            split = m is not None and saved[m] is not None and x.shape[0] % stages == 0
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=named(self.mesh, *(("stage",) if split else ())))
        return jax.tree_util.tree_map_with_path(one, shapes)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
