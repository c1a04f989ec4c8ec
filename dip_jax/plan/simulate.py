"""Event simulation of a plan: per-op start/end, iteration time, bubbles, memory per rank.

Two modes:
- "async": each rank runs its list in order as soon as inputs arrive (+ p2p latency), as in
  Megatron's asynchronous send/recv runtime (the paper's setting);
- "lockstep": the dip_jax executor. Each tick, a rank runs at most one forward and one
  backward op (one send in each direction); an op runs in the first tick after its inputs were
  produced, not before its rank's previous op, and shares that op's tick only if it is of the
  other kind. A tick lasts as long as its busiest rank (sum of its ops) plus a fixed tick
  overhead (the unconditional ppermutes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dip_jax.plan.indexed import Indexed
from dip_jax.plan.schedule import Op, Plan, ScheduleError


@dataclasses.dataclass
class Costs:
    """Latency and memory of each op of one batch (from the cost model, or given in tests)."""

    latency: Callable[[Op], float]
    p2p: Callable[[Op], float] = lambda op: 0.0          # send of op's output to another rank
    stored: Callable[[Op], float] = lambda op: 0.0       # bytes an F op keeps until its B
    working: Callable[[Op], float] = lambda op: 0.0      # transient bytes while a B op runs
    static: Callable[[int], float] = lambda rank: 0.0    # weights, grads, optimizer state
    tick_overhead: float = 0.0
    step_overhead: float = 0.0                           # once per step (measured by calibration)
    # the same for the strategy "store" (Plan.stored): the backward applies the residuals its
    # forward kept instead of recomputing it
    latency_stored: Callable[[Op], float] | None = None  # of an F or B op of a stored pair (default: `latency`)
    residual: Callable[[Op], float] = lambda op: 0.0     # bytes a storing F op keeps until its B
    working_stored: Callable[[Op], float] = lambda op: 0.0
    tick_overhead_stored: float | None = None            # a tick of a program with residual slots (default: the same)
    program_extra: float = 0.0                           # bytes a compiled step holds beyond its counted buffers


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

    def to_json(self) -> dict:
        """Plain JSON (ops as lists), so timelines cross process boundaries without pickle."""
        per_op = lambda d: [[[op.kind, op.module, op.chunk, op.mb, op.sub], v] for op, v in d.items()]
        return {"mode": self.mode, "start": per_op(self.start), "end": per_op(self.end), "tick": per_op(self.tick),
                "iteration_seconds": self.iteration_seconds, "busy_seconds": list(self.busy_seconds),
                "peak_memory": list(self.peak_memory),
                "memory_curve": [[list(p) for p in curve] for curve in self.memory_curve]}

    @classmethod
    def from_json(cls, d: dict) -> "Timeline":
        per_op = lambda items: {Op(*op): v for op, v in items}
        return cls(d["mode"], per_op(d["start"]), per_op(d["end"]), per_op(d["tick"]), d["iteration_seconds"],
                   d["busy_seconds"], d["peak_memory"], [[tuple(p) for p in c] for c in d["memory_curve"]])

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


def topological(ix, order: list[list[int]]) -> list[int]:
    """Op ids in an order that runs every rank's list in order; raises on deadlock."""
    heads = [0] * ix.P
    done = [False] * ix.n
    out: list[int] = []
    preds = ix.preds
    progress = True
    while progress:
        progress = False
        for r, ops in enumerate(order):
            h = heads[r]
            while h < len(ops) and all(done[p] for p in preds[ops[h]]):
                done[ops[h]] = True
                out.append(ops[h])
                h += 1
                progress = True
            heads[r] = h
    if len(out) != sum(len(o) for o in order):
        stuck = [str(ix.ops[ops[heads[r]]]) for r, ops in enumerate(order) if heads[r] < len(ops)]
        raise ScheduleError("deadlock", f"ranks wait on each other forever at {', '.join(stuck)}")
    return out


def run(ix, order: list[list[int]], mode: str):
    """Returns (start, end, tick or None, iteration seconds), lists indexed by op id."""
    if mode not in ("async", "lockstep"):
        raise ValueError(f"unknown simulation mode {mode!r}")
    n, lat, preds, rank = ix.n, ix.lat, ix.preds, ix.rank
    prev = [-1] * n
    for ops in order:
        for a, b in zip(ops, ops[1:]):
            prev[b] = a
    topo = topological(ix, order)
    start, end = [0.0] * n, [0.0] * n
    if mode == "async":
        p2p = ix.p2p
        for i in topo:
            r = rank[i]
            t = end[prev[i]] if prev[i] >= 0 else 0.0
            for p in preds[i]:
                v = end[p] + (p2p[p] if rank[p] != r else 0.0)
                if v > t:
                    t = v
            start[i], end[i] = t, t + lat[i]
        return start, end, None, max((end[i] for i in topo), default=0.0) + ix.step_overhead
    tick = [0] * n
    used = set()
    is_b = ix.is_b
    for i in topo:
        p = prev[i]
        t = 0 if p < 0 else (tick[p] if is_b[p] != is_b[i] else tick[p] + 1)
        for q in preds[i]:
            if tick[q] + 1 > t:
                t = tick[q] + 1
        r, k = rank[i], is_b[i]
        while (r, t, k) in used:
            t += 1
        used.add((r, t, k))
        tick[i] = t
    n_ticks = 1 + max((tick[i] for i in topo), default=-1)
    load = [[0.0] * ix.P for _ in range(n_ticks)]
    for i in topo:
        load[tick[i]][rank[i]] += lat[i]
    begin, acc = [], 0.0
    for row in load:
        begin.append(acc)
        acc += max(row) + ix.tick_overhead
    for i in topo:                                 # forwards run first within a tick
        s = begin[tick[i]]
        if is_b[i]:
            s += load[tick[i]][rank[i]] - lat[i]
        start[i], end[i] = s, s + lat[i]
    return start, end, tick, acc + ix.step_overhead


def iteration_seconds(ix, order: list[list[int]], mode: str = "lockstep") -> float:
    return run(ix, order, mode)[3]


def simulate(plan: Plan, costs: Costs, mode: str = "lockstep", ix=None) -> Timeline:
    ix = (ix or Indexed(plan.graph, costs)).with_stored(plan.stored)
    order = ix.order_ids(plan)
    start, end, tick, total = run(ix, order, mode)
    busy = [sum(ix.lat[i] for i in ops) for ops in order]
    peaks, curves = _memory(ix, order, start, end)
    ops = ix.ops
    used = [i for r in order for i in r]
    return Timeline(mode, {ops[i]: start[i] for i in used}, {ops[i]: end[i] for i in used},
                    {ops[i]: tick[i] for i in used} if tick is not None else {}, total, busy, peaks, curves)


def _memory(ix, order, start, end):
    peaks, curves = [], []
    for r, ops in enumerate(order):
        events = []
        for i in ops:
            if not ix.is_b[i]:
                if ix.stored[i]:
                    events.append((start[i], 1, ix.stored[i]))
            else:
                events += [(start[i], 1, ix.working[i]), (end[i], 0, -ix.working[i] - ix.stored[ix.pair[i]])]
        events.sort()
        base = ix.static[r]
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
