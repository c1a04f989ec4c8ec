"""Calibration: the profile the cost model reads, `pipeline.hardware=auto` in a real run, the
prediction error every run reports, and the packed reductions that keep a step's fixed cost low."""
import dataclasses
import json
import re
import statistics

import jax
import numpy as np
import optax
import pytest

from dip_jax.config import ConfigError
from dip_jax.config.overrides import apply_overrides, load_config_file
from dip_jax.plan import hardware
from dip_jax.plan.calibrated import Calibration, read
from dip_jax.plan.schedulers import PlanContext

OPS = {"llm": {"F": {"units": [1], "a": [1e-3], "b": [2e-3]}, "B": {"units": [1], "a": [2e-3], "b": [6e-3]}},
       "vision": {"F": {"units": [2, 4], "a": [1e-4, 2e-4], "b": [1e-4, 3e-4]},
                  "B": {"units": [2, 4], "a": [3e-4, 6e-4], "b": [3e-4, 9e-4]}}}
HEAD = {"llm": {"F": {"a": 0.0, "b": 5e-4}, "B": {"a": 0.0, "b": 1e-3}},
        "vision": {"F": {"a": 0.0, "b": 1e-5}, "B": {"a": 0.0, "b": 2e-5}}}


def _profile(tmp_path, **over):
    cal = Calibration(base="cpu", ops=OPS, head=HEAD, in_executor={"llm": {"F": 1e-4, "B": 2e-4}},
                      tick_seconds=5e-4, step_seconds=0.01, **over)
    path = tmp_path / "profile.json"
    cal.save(path)
    return cal, path


def test_a_profile_sets_op_tick_and_step_costs(root, tmp_path):
    cal, path = _profile(tmp_path)
    assert read(path) == cal and read(root / "dip_jax/plan/profiles/cpu.json") is None
    assert cal.op_seconds("llm", "F", 2, 1, last=False) == pytest.approx(1e-3 + 4e-3 + 1e-4)
    assert cal.op_seconds("llm", "B", 3, 1, last=True) == pytest.approx(2e-3 + 18e-3 + 1e-3 + 2e-4)
    assert cal.op_seconds("vision", "F", 2, 4, last=False) == pytest.approx(2e-4 + 2 * 3e-4)
    assert cal.op_seconds("vision", "F", 1, 3, last=False) == pytest.approx(1.5e-4 + 2e-4)     # between
    assert cal.op_seconds("vision", "F", 1, 6, last=True) == pytest.approx(3e-4 + 5e-4 + 6e-5)  # beyond
    assert cal.op_seconds("llm", "F", 1, 2, last=False) == pytest.approx(2e-3 + 4e-3 + 1e-4)    # one point
    half = dataclasses.replace(cal, scale=0.5)          # the level a real step pinned
    assert half.op_seconds("llm", "F", 2, 1, False) == pytest.approx(cal.op_seconds("llm", "F", 2, 1, False) / 2)
    assert (half.tick(), half.step()) == pytest.approx((cal.tick_seconds / 2, cal.step_seconds / 2))
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                          ["model.audio=none", f"pipeline.hardware={path}"])
    ctx = PlanContext(cfg)
    plain = PlanContext(apply_overrides(cfg, ["pipeline.hardware=cpu"]), partition=ctx.partition)
    assert ctx.cost.calibration == cal and plain.cost.calibration is None
    part = ctx.partition
    costs = part.costs(ctx.cost, cfg.model)
    assert costs.tick_overhead == cal.tick_seconds and costs.step_overhead == cal.step_seconds
    llm = part.module("llm")
    Lc = max(llm.layers)                     # the runtime computes every chunk at the stack's depth
    assert ctx.cost.op_seconds("llm", "B", Lc, 1) == pytest.approx(cal.op_seconds("llm", "B", Lc, 1, False))
    # the simulated step = ticks x (busiest rank + tick cost) + the step's fixed cost
    from dip_jax.data.pipeline import PackedBatches
    meta = PackedBatches(cfg, content=False).metadata(0)[:cfg.data.microbatches // cfg.mesh.data]
    res = ctx.plan(meta, "1f1b", rollouts=1)
    tl = res.lockstep
    per_tick = {}
    for op, t in tl.tick.items():
        rank = res.plan.graph.rank(op)
        per_tick.setdefault(t, {}).setdefault(rank, 0.0)
        per_tick[t][rank] += costs.latency(op)
    expect = sum(max(r.values()) for r in per_tick.values()) + tl.ticks * cal.tick_seconds + cal.step_seconds
    assert tl.iteration_seconds == pytest.approx(expect)
    # negative control: without the profile the step's fixed cost is not charged
    assert plain.plan(meta, "1f1b", rollouts=1).lockstep.iteration_seconds != pytest.approx(expect)


def test_hardware_values_are_checked(root, tmp_path):
    cfg = load_config_file(root / "configs/tiny_cpu.py")
    with pytest.raises(ConfigError, match="pipeline.hardware: 'h900' is neither 'auto', a .json profile nor one of"):
        apply_overrides(cfg, ["pipeline.hardware=h900"])
    with pytest.raises(ValueError, match="pipeline.hardware: no such file"):
        hardware.resolve(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="auto is resolved when training starts"):
        hardware.resolve("auto")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"calibration": 99}))
    with pytest.raises(ValueError, match="not a calibration profile of format 1"):
        hardware.resolve(str(bad))


def test_config_names_exactly_the_shipped_profiles(root):
    """The config checks `pipeline.hardware` against its own list (config imports nothing of the
    planner); the list and the planner's profile files must stay the same."""
    from dip_jax.config import HARDWARE_PROFILES
    assert list(HARDWARE_PROFILES) == hardware.available()
    for name in HARDWARE_PROFILES:
        assert hardware.load(name).name


def test_sharded_norm_is_optax_norm_with_one_reduction(root):
    """The global norm of a stage-layout tree: optax's value, one all-reduce operand in place of
    one per leaf (gloo runs a tuple all-reduce operand by operand)."""
    from dip_jax.runtime.mesh import make_mesh
    from dip_jax.runtime.norms import sharded_global_norm
    from dip_jax.train.optim import build_optimizer
    from dip_jax.train.state import create_state
    cfg = load_config_file(root / "configs/tiny_cpu.py")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.pipe)
    ctx = PlanContext(cfg)
    from dip_jax.runtime.stages import StageLayout
    layouts = {m.name: StageLayout(cfg.mesh.pipe, m.chunks // cfg.mesh.pipe, m.layers) for m in ctx.partition.modules}
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    params = create_state(cfg, tx, mesh, layouts)["params"]
    norm = jax.jit(sharded_global_norm(mesh, cfg.model.modules, True))
    np.testing.assert_allclose(float(norm(params)), float(optax.tree.norm(params)), rtol=1e-6)

    def operands(fn):
        hlo = fn.lower(params).compile().as_text()
        return [len(re.findall(r"[fs]\d+\[", m)) for m in re.findall(r"%[\w.\-]+ = (.*?) all-reduce\(", hlo)]
    packed = operands(norm)
    assert packed and max(packed) == 1, packed
    # negative control: optax's norm reduces every stage-split leaf separately
    assert max(operands(jax.jit(optax.tree.norm))) > 2


@pytest.fixture(scope="module")
def auto_run(root, tmp_path_factory, xla_cache):
    """3 steps of a small tiny_cpu (no audio, pipe=2) with pipeline.hardware=auto, then 1 more
    step resumed from the checkpoint in the same workdir."""
    from dip_jax.train.trainer import run
    work = tmp_path_factory.mktemp("auto")
    base = ["train.progress=false", f"pipeline.compile_cache_dir={xla_cache}", "model.audio=none", "mesh.data=1",
            "mesh.pipe=2", "data.microbatches=2", "pipeline.hardware=auto", "train.timeline_first=1",
            "checkpoint.every=3"]
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), [*base, "train.steps=3"])
    first = run(cfg, work)
    profiles = sorted((work / "calibration").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in profiles]
    second = run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4)), work)
    return work, first, second, profiles, stamps


def test_auto_calibrates_once_and_every_step_reports_its_prediction_error(auto_run):
    work, first, second, profiles, stamps = auto_run
    assert len(profiles) == 1 and [p.stat().st_mtime_ns for p in profiles] == stamps   # reused, not remeasured
    cal = read(profiles[0])
    assert cal.key["mesh"] == {"data": 1, "pipe": 2} and cal.key["backend"] == jax.default_backend()
    assert set(cal.ops) == {"vision", "llm"} and cal.tick_seconds > 0 and cal.step_seconds > 0
    for m in cal.accuracy.values():                       # held-out shapes were measured
        for k in m.values():
            assert k and all(a["measured"] > 0 and np.isfinite(a["predicted"]) for a in k)
    records = [json.loads(l) for l in open(work / "metrics.jsonl") if '"train"' in l]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["prediction_error"] == pytest.approx(r["step_seconds"] / r["predicted_step_seconds"] - 1)
    steady = [abs(r["prediction_error"]) for r in records if not r["step_compiled"]]
    assert records[-1]["step_compiled"]                   # a new process compiles (or loads) its program
    assert second["prediction_error_median_abs"] == pytest.approx(statistics.median(steady))
    title = json.loads((work / "timelines/step_1.trace.json").read_text())["traceEvents"][0]["args"]["name"]
    assert "measured" in title and "prediction error" in title
