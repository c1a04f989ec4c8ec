"""Greedy list scheduling of a batch's ops onto ranks (paper §5.2, dual-queue interleaving).

Each rank keeps a forward and a backward queue of ready ops. The rank that can start an op
earliest goes next. If both queues hold ops ready by the time the rank is free, it alternates
F/B (1F1B-like), taking the highest-priority ready op; otherwise it takes the op that can start
first, filling the bubble. Forward queues are gated by memory (and, for the baselines, by a cap
on microbatches in flight). The baselines are policies of the same engine.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable

from dip_jax.plan.indexed import Indexed
from dip_jax.plan.schedule import F, Graph, Op, Plan
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
    """Ready ops of one kind on one rank, by (ready time, priority) and by priority."""

    __slots__ = ("by_time", "by_prio", "taken")

    def __init__(self):
        self.by_time: list = []
        self.by_prio: list = []
        self.taken: set = set()

    def push(self, i: int, t: float, prio: int):
        heapq.heappush(self.by_time, (t, prio, i))
        heapq.heappush(self.by_prio, (prio, t, i))

    def earliest(self):
        h, taken = self.by_time, self.taken
        while h and h[0][2] in taken:
            heapq.heappop(h)
        return h[0] if h else None

    def best_ready(self, t_ready: float, allowed=None):
        """(t, prio, id) of the most urgent op ready by t_ready (and `allowed`), else None."""
        h, taken = self.by_prio, self.taken
        while h and h[0][2] in taken:
            heapq.heappop(h)
        for prio, t, i in heapq.nsmallest(8, h) if len(h) > 1 else h:
            if i not in taken and t <= t_ready and (allowed is None or allowed(i)):
                return t, prio, i
        return None

    def first_allowed(self, allowed):
        for t, prio, i in heapq.nsmallest(256, self.by_time):
            if i not in self.taken and allowed(i):
                return t, prio, i
        return None


def interleave(graph: Graph, costs: Costs, policy: Policy, ix: Indexed | None = None) -> Plan:
    ix = ix or Indexed(graph, costs)
    return ix.plan(interleave_ids(ix, policy), policy.name)


def priority_ranks(ix: Indexed, priority: Callable[[Op], tuple]) -> list[int]:
    keys = sorted(range(ix.n), key=lambda i: priority(ix.ops[i]))
    rank = [0] * ix.n
    for pos, i in enumerate(keys):
        rank[i] = pos
    return rank


def interleave_ids(ix: Indexed, policy: Policy, prio: list[int] | None = None) -> list[list[int]]:
    P, n = ix.P, ix.n
    prio = prio if prio is not None else priority_ranks(ix, policy.priority)
    rank, is_b, lat, p2p, succs, stored, pair = ix.rank, ix.is_b, ix.lat, ix.p2p, ix.succs, ix.stored, ix.pair
    has_b = ix.has_backward
    mb = [op.mb for op in ix.ops]
    waiting = [len(p) for p in ix.preds]
    ready_at = [0.0] * n
    queues = [(_Queue(), _Queue()) for _ in range(P)]
    f_left = [0] * P
    b_left = [dict() for _ in range(P)]          # mb -> backward ops left on the rank
    for i in range(n):
        r = rank[i]
        if not is_b[i]:
            f_left[r] += 1
        else:
            b_left[r][mb[i]] = b_left[r].get(mb[i], 0) + 1
        if waiting[i] == 0:
            queues[r][is_b[i]].push(i, 0.0, prio[i])
    t_last = [0.0] * P
    last_b = [True] * P
    live = list(ix.static)
    inflight: list[set] = [set() for _ in range(P)]
    order: list[list[int]] = [[] for _ in range(P)]
    cap, limit = policy.memory_cap, policy.inflight
    gated = cap is not None or limit is not None

    def f_ok(r: int, i: int) -> bool:
        if cap is not None and live[r] > cap:
            return False
        if limit is not None and mb[i] not in inflight[r] and b_left[r].get(mb[i]) and len(inflight[r]) >= limit(r):
            return False
        return True

    def candidates(r: int, strict: bool):
        qf, qb = queues[r]
        ef = qf.earliest()
        if ef is not None and strict and gated and not f_ok(r, ef[2]):
            ef = qf.first_allowed(lambda i: f_ok(r, i))
        eb = None if (policy.forwards_first and strict and f_left[r]) else qb.earliest()
        return ef, eb

    cache: list = [None] * P                 # per rank: (earliest start, ef, eb), None = stale
    for _ in range(n):
        pick = None
        for strict in (True, False):          # never stall: relax the gates if nothing can go
            best_t = INF
            for r in range(P):
                c = cache[r] if strict else None
                if c is None:
                    ef, eb = candidates(r, strict)
                    if ef is None and eb is None:
                        c = (INF, None, None)
                    else:
                        t = min(e[0] for e in (ef, eb) if e is not None)
                        c = (t if t > t_last[r] else t_last[r], ef, eb)
                    if strict:
                        cache[r] = c
                if c[0] < best_t:
                    best_t, pick = c[0], (r, c[1], c[2])
            if pick is not None:
                break
        r, ef, eb = pick
        cache[r] = None
        tl = t_last[r]
        if ef is not None and eb is not None and ef[0] <= tl and eb[0] <= tl:
            if not policy.alternate or not last_b[r]:
                i = (queues[r][1].best_ready(tl) or eb)[2]
            else:
                got = queues[r][0].best_ready(tl, (lambda j: f_ok(r, j)) if gated else None)
                i = (got or ef)[2]
        else:
            i = min((e for e in (ef, eb) if e is not None), key=lambda e: (e[0], e[1]))[2]
        queues[r][is_b[i]].taken.add(i)
        s = ready_at[i] if ready_at[i] > tl else tl
        e = s + lat[i]
        t_last[r], last_b[r] = e, is_b[i]
        order[r].append(i)
        if not is_b[i]:
            f_left[r] -= 1
            if has_b[i]:
                live[r] += stored[i]
                inflight[r].add(mb[i])
        else:
            live[r] -= stored[pair[i]]
            b_left[r][mb[i]] -= 1
            if b_left[r][mb[i]] == 0:
                inflight[r].discard(mb[i])
        for s_ in succs[i]:
            rs = rank[s_]
            v = e + (p2p[i] if rs != r else 0.0)
            if v > ready_at[s_]:
                ready_at[s_] = v
            waiting[s_] -= 1
            if waiting[s_] == 0:
                queues[rs][is_b[s_]].push(s_, ready_at[s_], prio[s_])
                cache[rs] = None
    return order


def tick_ids(ix: Indexed, prio: list[int], memory_cap: float | None = None) -> tuple[list[list[int]], float | None]:
    """Lock-step list scheduling: tick by tick, every rank runs its most urgent ready forward
    (memory permitting) and its most urgent ready backward, the executor's tick model exactly.
    Cheaper than `interleave_ids` and often better in lock-step, since it never plans around
    asynchronous timing the executor does not have.

    Returns (order, lock-step seconds). The simulator assigns this order the same ticks unless
    the memory gate held a forward back; the seconds are then None (simulate to know)."""
    P = ix.P
    rank, is_b, succs, stored, pair, lat = ix.rank, ix.is_b, ix.succs, ix.stored, ix.pair, ix.lat
    waiting = [len(p) for p in ix.preds]
    ready: list[tuple[list, list]] = [([], []) for _ in range(P)]
    for i in range(ix.n):
        if waiting[i] == 0:
            heapq.heappush(ready[rank[i]][is_b[i]], (prio[i], i))
    live = list(ix.static)
    order: list[list[int]] = [[] for _ in range(P)]
    left, seconds, exact = ix.n, 0.0, True
    while left:
        picked = []
        for gated in (True, False):                 # never stall: ignore memory if nothing can run
            for r in range(P):
                f, b = ready[r]
                if f:
                    if gated and memory_cap is not None and live[r] > memory_cap:
                        exact = False
                    else:
                        picked.append(heapq.heappop(f)[1])
                if b and gated:
                    picked.append(heapq.heappop(b)[1])
            if picked:
                break
        load = [0.0] * P
        for i in picked:                            # forwards first within a tick, as executed
            if not is_b[i]:
                order[rank[i]].append(i)
                live[rank[i]] += stored[i]
        for i in picked:
            load[rank[i]] += lat[i]
            if is_b[i]:
                order[rank[i]].append(i)
                live[rank[i]] -= stored[pair[i]]
        seconds += max(load) + ix.tick_overhead
        left -= len(picked)
        for i in picked:
            for s in succs[i]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    heapq.heappush(ready[rank[s]][is_b[s]], (prio[s], s))
    return order, (seconds + ix.step_overhead if exact else None)
