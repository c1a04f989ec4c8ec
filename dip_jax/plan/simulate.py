"""Event simulation of a plan: per-op start/end, iteration time, bubbles, memory per rank.

Two modes:
- "async": each rank runs its list in order as soon as inputs arrive (+ p2p latency), as in
  Megatron's asynchronous send/recv runtime (the paper's setting);
- "lockstep": the dip_jax executor. Ops are assigned to ticks (an op runs in the first tick
  after its inputs were produced and after its rank's previous op); every tick lasts as long as
  its slowest op plus a fixed tick overhead (the unconditional ppermutes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dip_jax.plan.schedule import B, F, Op, Plan, ScheduleError, order_topological


@dataclasses.dataclass
class Costs:
    """Latency and memory of each op of one batch (from the cost model, or given in tests)."""

    latency: Callable[[Op], float]
    p2p: Callable[[Op], float] = lambda op: 0.0          # send of op's output to another rank
    stored: Callable[[Op], float] = lambda op: 0.0       # bytes an F op keeps until its B
    working: Callable[[Op], float] = lambda op: 0.0      # transient bytes while a B op runs
    static: Callable[[int], float] = lambda rank: 0.0    # weights, grads, optimizer state
    tick_overhead: float = 0.0


@dataclasses.dataclass
class Timeline:
    mode: str
    start: dict
    end: dict
    tick: dict
    iteration_seconds: float
    busy_seconds: list            # per rank: sum of its op latencies
    peak_memory: list             # per rank, bytes (static included)
    memory_curve: list            # per rank: [(time, bytes)]

    @property
    def lower_bound_seconds(self) -> float:
        return max(self.busy_seconds)

    @property
    def bubble_fraction(self) -> float:
        """1 - lower bound / iteration time; lower bound = the busiest rank's op time."""
        return 1.0 - self.lower_bound_seconds / self.iteration_seconds if self.iteration_seconds else 0.0

    @property
    def total_bubble_fraction(self) -> float:
        """Idle share of all ranks (stage imbalance included): 1 - mean busy / iteration time."""
        mean = sum(self.busy_seconds) / len(self.busy_seconds)
        return 1.0 - mean / self.iteration_seconds if self.iteration_seconds else 0.0

    @property
    def ticks(self) -> int:
        return 1 + max(self.tick.values(), default=-1)


def simulate(plan: Plan, costs: Costs, mode: str = "lockstep") -> Timeline:
    if mode not in ("async", "lockstep"):
        raise ValueError(f"unknown simulation mode {mode!r}")
    g = plan.graph
    topo = order_topological(plan)                 # raises on deadlock
    lat = {op: costs.latency(op) for op in topo}
    prev: dict[Op, Op] = {}
    for ops in plan.order:
        for a, b in zip(ops, ops[1:]):
            prev[b] = a
    start, end, tick = {}, {}, {}
    if mode == "async":
        for op in topo:
            r = g.rank(op)
            t = end[prev[op]] if op in prev else 0.0
            for p in g.preds(op):
                t = max(t, end[p] + (costs.p2p(p) if g.rank(p) != r else 0.0))
            start[op], end[op] = t, t + lat[op]
        total = max(end.values(), default=0.0)
    else:
        for op in topo:
            t = tick[prev[op]] + 1 if op in prev else 0
            for p in g.preds(op):
                t = max(t, tick[p] + 1)
            tick[op] = t
        n = 1 + max(tick.values(), default=-1)
        length = [0.0] * n
        for op, t in tick.items():
            length[t] = max(length[t], lat[op])
        begin, acc = [], 0.0
        for L in length:
            begin.append(acc)
            acc += L + costs.tick_overhead
        for op, t in tick.items():
            start[op], end[op] = begin[t], begin[t] + lat[op]
        total = acc
    busy = [sum(lat[o] for o in ops) for ops in plan.order]
    peaks, curves = _memory(plan, costs, start, end)
    return Timeline(mode, start, end, tick, total, busy, peaks, curves)


def _memory(plan: Plan, costs: Costs, start, end):
    g = plan.graph
    peaks, curves = [], []
    for r, ops in enumerate(plan.order):
        events = []
        for op in ops:
            if op.kind == F:
                kept = costs.stored(op) if g.module(op.module).backward else 0.0
                events.append((start[op], 1, kept))
                if kept:
                    events.append((end[Op(B, op.module, op.chunk, op.mb, op.sub)], 0, -kept))
            else:
                w = costs.working(op)
                events += [(start[op], 1, w), (end[op], 0, -w)]
        events.sort()
        base = costs.static(r)
        cur, peak, curve = base, base, [(0.0, base)]
        for t, _, delta in events:
            cur += delta
            peak = max(peak, cur)
            curve.append((t, cur))
        peaks.append(peak)
        curves.append(curve)
    return peaks, curves


def check_memory(timeline: Timeline, cap: float) -> None:
    worst = max(timeline.peak_memory)
    if worst > cap:
        raise ScheduleError("memory", f"peak {worst / 1e9:.2f} GB exceeds the cap {cap / 1e9:.2f} GB")
