"""Planning ahead: plans of the configured scheduler, and the interleaved-1F1B fallback with its reason."""
import pytest

from dip_jax.data.pipeline import PackedBatches
from dip_jax.config.overrides import apply_overrides, load_config_file
from dip_jax.plan.validate import validate
from dip_jax.train.planning import FALLBACK, Planner


@pytest.fixture(scope="module")
def cfg(root):
    return load_config_file(root / "configs/tiny_cpu.py")


def _metadata(cfg, step):
    return PackedBatches(cfg, content=False).metadata(step - 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_plans_are_deterministic_and_a_raising_planner_falls_back(cfg, workers):
    cfg = apply_overrides(cfg, [f"pipeline.plan_workers={workers}", "pipeline.plan_faults=((2, 'raise'),)"])
    planner = Planner(cfg)
    try:
        for step in (1, 2, 3):
            planner.submit(step, _metadata(cfg, step))
        got = [planner.get(step, _metadata(cfg, step)) for step in (1, 2, 3)]
    finally:
        planner.close()
    assert [p.scheduler for p in got] == ["dip", FALLBACK, "dip"]
    assert [p.fallback for p in got] == [None, "error: RuntimeError: planner fault injected at step 2", None]
    for p in got:
        assert len(p.replicas) == cfg.mesh.data
        for r in p.replicas:
            validate(r.plan)
    again = Planner(apply_overrides(cfg, ["pipeline.plan_faults=()"]))
    again.submit(3, _metadata(cfg, 3))
    assert again.get(3, _metadata(cfg, 3)).plans == got[2].plans        # same step, same batch: same plan
    again.close()


def test_a_late_plan_falls_back_at_the_deadline_and_the_next_one_arrives(cfg):
    cfg = apply_overrides(cfg, ["pipeline.plan_deadline_seconds=6", "pipeline.plan_faults=((1, 'late'),)"])
    planner = Planner(cfg)
    try:
        for step in (1, 2):
            planner.submit(step, _metadata(cfg, step))
        late = planner.get(1, _metadata(cfg, 1))
        assert late.scheduler == FALLBACK and late.fallback == "deadline: no dip plan after 6 s"
        assert 6.0 <= late.wait_seconds < 9.0
        nxt = planner.get(2, _metadata(cfg, 2))           # its job moved to the fresh workers (which start in ~1 s)
        assert nxt.scheduler == "dip" and nxt.fallback is None
        missing = planner.get(7, _metadata(cfg, 7))
        assert missing.fallback == "error: LookupError: no plan was requested for step 7"
    finally:
        planner.close()
