"""Stage-resident train state: each pipeline rank holds only its chunks' parameters and
optimizer moments; a training step is one compiled program with nothing but its inputs crossing
to the devices; checkpoints restore under any layout."""
import collections
import functools
import glob
import re

import jax
import numpy as np
import pytest

from dip_jax.data.pipeline import PackedBatches
from dip_jax.config.overrides import apply_overrides, load_config_file
from dip_jax.plan import tables as T
from dip_jax.plan.schedulers import PlanContext
from dip_jax.runtime.mesh import make_mesh
from dip_jax.runtime.stages import block_module
from dip_jax.train.optim import build_optimizer
from dip_jax.train.state import abstract_model, create_state, model_layouts, state_bytes


def _cfg(root, *overrides):
    return apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                           ["model.vision.layers=8", "model.audio.layers=8", "model.llm.layers=8",
                            "train.progress=false", *overrides])


def _replicated_bytes(state) -> int:
    tree = {"params": state["params"], "opt_state": state["opt_state"]}
    return sum(x.nbytes for x in jax.tree.leaves(tree) if x.sharding.is_fully_replicated)


def _within_bound(state, layouts, pipe, small) -> tuple[bool, str]:
    """per device <= 1.15 x total / pipe + the replicated small parameters (`small` bytes)."""
    total, per_device = state_bytes(state, layouts)
    bound = 1.15 * total / pipe + small
    return per_device <= bound, f"{per_device} bytes on one device, bound {bound:.0f} (total {total})"


@pytest.mark.parametrize("data,pipe", [(2, 4), (1, 8)])
def test_each_rank_holds_only_its_chunks(root, data, pipe):
    cfg = _cfg(root, f"mesh.data={data}", f"mesh.pipe={pipe}")
    mesh = make_mesh(data, pipe)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    partition = PlanContext(cfg).partition
    layouts = {m.name: l for m in partition.modules for l in [_layout(m, pipe)]}
    state = create_state(cfg, tx, mesh, layouts)
    small = _replicated_bytes(state)
    ok, msg = _within_bound(state, layouts, pipe, small)
    assert ok, msg
    # every block stack (a parameter or one of its moments) is split over the stages
    leaves = jax.tree_util.tree_flatten_with_path({"p": state["params"], "o": state["opt_state"]})[0]
    blocks = [x for path, x in leaves if block_module(path, cfg.model.modules)]
    assert len(blocks) == 3 * len(jax.tree.leaves(jax.tree_util.tree_map_with_path(
        lambda p, x: x if block_module(p, cfg.model.modules) else None, state["params"])))
    for x in blocks:
        assert x.shape[0] == pipe and {s.data.shape[0] for s in x.addressable_shards} == {1}
    # the replicated rest is small next to the blocks
    assert small < 0.25 * state_bytes(state, layouts)[0]
    # negative control: the model layout (whole model on every device) breaks the bound
    replicated = create_state(cfg, tx, mesh, model_layouts(cfg))
    assert not _within_bound(replicated, model_layouts(cfg), pipe, small)[0]


def _layout(m, pipe):
    from dip_jax.runtime.stages import StageLayout
    return StageLayout(pipe, m.chunks // pipe, m.layers)


def _executions(trace_dir) -> collections.Counter:
    """Programs launched on device 0 during a profiler trace, by name."""
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    out = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                hit = re.match(r"\[0\] \S*Execute \((.+)\)$", ev.name)
                if hit:
                    out[hit.group(1)] += 1
    return out


def test_a_step_is_one_program_and_moves_nothing_but_its_inputs(root, tmp_path):
    from dip_jax.train.pipelined import PipelinedStep
    from dip_jax.train.planning import plan_batch, reorder
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), ["train.progress=false"])
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.pipe)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    ctx = PlanContext(cfg)
    step = PipelinedStep(cfg, abstract_model(cfg)[1], mesh, tx, ctx)
    state = create_state(cfg, tx, mesh, step.layouts)
    source = PackedBatches(cfg)
    batches = []
    for i in range(4):
        batch = source(i)
        order, replicas = plan_batch(ctx, i, batch.metadata, "1f1b")
        batches.append((reorder(batch.arrays, order), [r.plan for r in replicas]))
    buckets = functools.reduce(T.widen, [T.buckets_for(plans) for _, plans in batches])
    inputs = [step.executor.prepare(arrays, plans, buckets) for arrays, plans in batches]
    state, _ = step.executor.run_train(state, *inputs[0])            # compiles
    jax.block_until_ready(state)
    calls_before = step.executor.cache.stats.hits
    losses = []
    with jax.profiler.trace(str(tmp_path)):
        for args in inputs[1:]:
            old = state["params"]
            with jax.transfer_guard("disallow"):
                state, metrics = step.executor.run_train(state, *args)
            assert all(x.is_deleted() for x in jax.tree.leaves(old)), "the state is not donated"
            losses.append(jax.device_get(metrics["loss"]))
        jax.block_until_ready(state)
    launched = _executions(tmp_path)
    assert sum(launched.values()) == 3 and len(launched) == 1, launched
    assert step.executor.cache.stats.hits - calls_before == 3 and step.executor.cache.stats.compiled == 1
    assert all(np.isfinite(losses))
    # negative control: the same guard catches an implicit transfer
    with pytest.raises(Exception, match="[Dd]isallowed"):
        with jax.transfer_guard("disallow"):
            jax.numpy.asarray(np.ones(3)) + 1

