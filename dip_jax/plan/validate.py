"""Plan validation: the only check a plan passes before anything executes it.

Apart from the IR (schedule.py) because it runs the simulator (simulate.py), which reads the IR:
the IR itself imports nothing of the planner.
"""
from __future__ import annotations

from dip_jax.plan.indexed import Indexed
from dip_jax.plan.schedule import F, Op, Plan, ScheduleError
from dip_jax.plan.simulate import Costs, check_memory, simulate, topological


def validate(plan: Plan, costs=None, memory_cap: float | None = None) -> None:
    """Raise ScheduleError unless every op appears exactly once on its rank, each rank's order
    respects same-rank dependencies, the ranks cannot deadlock, and (given `costs`, a
    `simulate.Costs`) no rank's simulated peak memory exceeds `memory_cap`."""
    g = plan.graph
    if len(plan.order) != g.P:
        raise ScheduleError("ranks", f"plan has {len(plan.order)} rank lists, graph has P={g.P}")
    expected = set(g.ops())
    seen: set[Op] = set()
    for r, ops in enumerate(plan.order):
        for op in ops:
            if op in seen:
                raise ScheduleError("duplicate", f"{op} appears twice")
            if op not in expected:
                raise ScheduleError("unknown", f"{op} is not an op of this batch")
            if g.rank(op) != r:
                raise ScheduleError("wrong_rank", f"{op} belongs on rank {g.rank(op)}, found on rank {r}")
            seen.add(op)
    for op in plan.stored:
        if op.kind != F or op not in expected or not g.module(op.module).backward:
            raise ScheduleError("strategy", f"{op} cannot store residuals: only forward ops of trained modules have a backward")
    missing = expected - seen
    if missing:
        raise ScheduleError("missing", f"{len(missing)} ops missing, e.g. {min(missing)}")
    for r, ops in enumerate(plan.order):
        pos = {op: i for i, op in enumerate(ops)}
        for i, op in enumerate(ops):
            for p in g.preds(op):
                if g.rank(p) == r and pos[p] > i:
                    raise ScheduleError("dependency", f"rank {r} runs {op} before its input {p}")
    ix = Indexed(g, Costs(latency=lambda op: 0.0))
    topological(ix, ix.order_ids(plan))                # raises ScheduleError("deadlock")
    if costs is not None and memory_cap is not None:
        check_memory(simulate(plan, costs, "async"), memory_cap)
