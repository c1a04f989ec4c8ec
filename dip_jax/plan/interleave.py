"""Greedy list scheduling of a batch's ops onto ranks (paper §5.2, dual-queue interleaving).

Each rank keeps a forward and a backward queue of ready ops. The rank that can start an op
earliest goes next. If both queues hold ops ready by the time the rank is free, it alternates
F/B (1F1B-like) taking the highest-priority ready op; otherwise it takes the op that can start
first, filling the bubble. Forward queues are gated by memory (and, for the baselines, by a cap
on microbatches in flight). The baselines are policies of the same engine.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable

from dip_jax.plan.schedule import B, F, Graph, Op, Plan
from dip_jax.plan.simulate import Costs

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    priority: Callable[[Op], tuple]             # smaller = more urgent
    alternate: bool = True                      # DIP: alternate F/B; baselines prefer B
    inflight: Callable[[int], int] | None = None   # max microbatches in flight per rank
    forwards_first: bool = False                # GPipe: every F of a rank before its first B
    memory_cap: float | None = None


def default_priority(graph: Graph) -> Callable[[Op], tuple]:
    """Microbatch order, then graph order of modules (encoders, llm, dit), sub, chunk."""
    pos = {m.name: i for i, m in enumerate(graph.modules)}
    return lambda op: (op.mb, pos[op.module], op.sub, op.chunk if op.kind == F else -op.chunk)


class _Queue:
    """Ready ops of one kind on one rank: earliest start and best priority, lazily deleted."""

    def __init__(self):
        self.by_time: list = []
        self.by_prio: list = []
        self.taken: set = set()

    def push(self, op, t, prio):
        heapq.heappush(self.by_time, (t, prio, op))
        heapq.heappush(self.by_prio, (prio, t, op))

    def _clean(self, h):
        while h and h[0][2] in self.taken:
            heapq.heappop(h)

    def earliest(self):
        self._clean(self.by_time)
        return self.by_time[0] if self.by_time else None

    def best_ready(self, t_ready):
        """Highest priority op that can start by t_ready (None if none)."""
        self._clean(self.by_prio)
        skipped, found = [], None
        while self.by_prio:
            item = heapq.heappop(self.by_prio)
            if item[2] in self.taken:
                continue
            if item[1] <= t_ready:
                found = item
                break
            skipped.append(item)
            if len(skipped) > 64:      # rare: fall back to the earliest op
                break
        for s in skipped:
            heapq.heappush(self.by_prio, s)
        if found is None:
            e = self.earliest()
            return (e[1], e[0], e[2]) if e else None
        heapq.heappush(self.by_prio, found)
        return found

    def take(self, op):
        self.taken.add(op)


def interleave(graph: Graph, costs: Costs, policy: Policy) -> Plan:
    P = graph.P
    ops = graph.ops()
    preds = {op: graph.preds(op) for op in ops}
    succs: dict[Op, list[Op]] = {op: [] for op in ops}
    for op in ops:
        for p in preds[op]:
            succs[p].append(op)
    waiting = {op: len(preds[op]) for op in ops}
    ready_at = {op: 0.0 for op in ops}
    lat = {op: costs.latency(op) for op in ops}
    prio = {op: policy.priority(op) for op in ops}
    queues = [{F: _Queue(), B: _Queue()} for _ in range(P)]
    f_left = [0] * P
    b_left_mb = [dict() for _ in range(P)]          # mb -> B ops still to run on the rank
    for op in ops:
        r = graph.rank(op)
        if op.kind == F:
            f_left[r] += 1
        elif graph.module(op.module).backward:
            b_left_mb[r][op.mb] = b_left_mb[r].get(op.mb, 0) + 1
        if waiting[op] == 0:
            queues[r][op.kind].push(op, 0.0, prio[op])
    t_last = [0.0] * P
    last_kind = [B] * P
    live = [costs.static(r) for r in range(P)]
    inflight: list[set] = [set() for _ in range(P)]
    end: dict[Op, float] = {}
    order: list[list[Op]] = [[] for _ in range(P)]
    remaining = len(ops)

    def f_allowed(r, op, strict):
        if not strict:
            return True
        if policy.memory_cap is not None and live[r] > policy.memory_cap:
            return False
        if policy.inflight is not None and op.mb not in inflight[r] and b_left_mb[r].get(op.mb) \
                and len(inflight[r]) >= policy.inflight(r):
            return False
        return True

    def candidates(r, strict):
        """(earliest start, op) per kind this rank may run now."""
        out = {}
        for kind in (F, B):
            if kind == B and policy.forwards_first and strict and f_left[r]:
                continue
            q = queues[r][kind]
            e = q.earliest()
            if e is None:
                continue
            if kind == F and not f_allowed(r, e[2], strict):
                # gated: only forwards of microbatches already in flight may go
                best = None
                for t, p, op in sorted(q.by_time)[:256]:
                    if op not in q.taken and op.mb in inflight[r] and (
                            policy.memory_cap is None or live[r] <= policy.memory_cap):
                        best = (t, p, op)
                        break
                if best is None:
                    continue
                e = best
            out[kind] = e
        return out

    while remaining:
        pick = None
        for strict in (True, False):          # never stall: relax the gates if nothing can go
            best_t = INF
            for r in range(P):
                c = candidates(r, strict)
                if not c:
                    continue
                t = max(t_last[r], min(e[0] for e in c.values()))
                if t < best_t:
                    best_t, pick = t, (r, c)
            if pick is not None:
                break
        r, c = pick
        q = queues[r]
        if F in c and B in c and c[F][0] <= t_last[r] and c[B][0] <= t_last[r]:
            kind = (B if last_kind[r] == F else F) if policy.alternate else B
            chosen = q[kind].best_ready(t_last[r])[2]
            if kind == F and not f_allowed(r, chosen, True):
                chosen = c[F][2]
        else:
            chosen = min(c.values(), key=lambda e: (e[0], e[1]))[2]
        q[chosen.kind].take(chosen)
        start = max(t_last[r], ready_at[chosen])
        end[chosen] = start + lat[chosen]
        t_last[r], last_kind[r] = end[chosen], chosen.kind
        order[r].append(chosen)
        remaining -= 1
        bwd = graph.module(chosen.module).backward
        if chosen.kind == F:
            f_left[r] -= 1
            if bwd:
                live[r] += costs.stored(chosen)
                inflight[r].add(chosen.mb)
        else:
            live[r] -= costs.stored(Op(F, chosen.module, chosen.chunk, chosen.mb, chosen.sub))
            b_left_mb[r][chosen.mb] -= 1
            if b_left_mb[r][chosen.mb] == 0:
                inflight[r].discard(chosen.mb)
        for s in succs[chosen]:
            rs = graph.rank(s)
            ready_at[s] = max(ready_at[s], end[chosen] + (costs.p2p(chosen) if rs != r else 0.0))
            waiting[s] -= 1
            if waiting[s] == 0:
                queues[rs][s.kind].push(s, ready_at[s], prio[s])
    return Plan(graph, tuple(tuple(o) for o in order), policy.name)
