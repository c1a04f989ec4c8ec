"""DIP's schedule search (paper §5.1): MCTS over segment priorities, scored in lock-step.

A group is (module, microbatch): all its segments share one priority and keep their order.
Groups of one module also keep microbatch order, so a priority sequence is an interleaving of
the per-module sequences and each tree level chooses which module's next group comes first.
Nodes keep the best score seen below them (not the mean); UCB = s^alpha + beta*sqrt(ln N/n).
Rollouts complete a prefix at random (biased toward microbatch order), run the dual-queue
interleaver and the lock-step list scheduler and keep the plan with the shorter lock-step time.
Deterministic for a given seed and rollout budget.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time

from dip_jax.plan.indexed import Indexed
from dip_jax.plan.interleave import Policy, default_priority, interleave_ids, priority_ranks, tick_ids
from dip_jax.plan.schedule import Graph, Plan
from dip_jax.plan.simulate import Costs, iteration_seconds

ALPHA, BETA, GREEDY = 4.0, 0.2, 0.7


@dataclasses.dataclass
class SearchStats:
    rollouts: int = 0
    seconds: float = 0.0
    default_seconds: float = 0.0      # lock-step time of the plain microbatch-order priority
    best_seconds: float = 0.0


class _Node:
    __slots__ = ("children", "visits", "best")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.visits = 0
        self.best = 0.0


def _groups(graph: Graph) -> list[list[tuple[str, int]]]:
    """Per module (graph order), its groups in microbatch order (microbatches with work only)."""
    return [[(m.name, mb) for mb in range(graph.microbatches) if graph.n_subs(m.name, mb)]
            for m in graph.modules]


def _within_group_ranks(ix: Indexed) -> list[int]:
    """Per op: its fixed position inside its (module, microbatch) group: sub, then chunk order."""
    keys = sorted(range(ix.n), key=lambda i: (ix.ops[i].sub, ix.ops[i].chunk if not ix.is_b[i] else -ix.ops[i].chunk))
    within = [0] * ix.n
    for pos, i in enumerate(keys):
        within[i] = pos
    return within


def _sequence(lanes, choices: list[int]) -> list[tuple[str, int]]:
    pos = [0] * len(lanes)
    out = []
    for c in choices:
        out.append(lanes[c][pos[c]])
        pos[c] += 1
    return out


def _open_lanes(lanes, choices):
    pos = [0] * len(lanes)
    for c in choices:
        pos[c] += 1
    return [i for i, l in enumerate(lanes) if pos[i] < len(l)], pos


def _complete(lanes, prefix: list[int], rng: random.Random) -> list[int]:
    """Random completion, biased toward taking the lane whose next microbatch is earliest."""
    choices = list(prefix)
    open_, pos = _open_lanes(lanes, choices)
    while open_:
        if len(open_) == 1 or rng.random() < GREEDY:
            c = min(open_, key=lambda i: (lanes[i][pos[i]][1], i))
        else:
            c = rng.choice(open_)
        choices.append(c)
        pos[c] += 1
        if pos[c] == len(lanes[c]):
            open_.remove(c)
    return choices


def list_schedule(ix: Indexed, prio: list[int], policy: Policy) -> tuple[list[list[int]], float]:
    """Two list schedulers for one priority, scored lock-step: the better plan and its seconds."""
    order = interleave_ids(ix, policy, prio)
    t = iteration_seconds(ix, order, "lockstep")
    ticked, t_ticked = tick_ids(ix, prio, policy.memory_cap)
    if t_ticked is None:
        t_ticked = iteration_seconds(ix, ticked, "lockstep")
    return (ticked, t_ticked) if t_ticked < t else (order, t)


def default_seconds(graph: Graph, costs: Costs, memory_cap: float | None = None) -> float:
    """Lock-step seconds of the search's starting point (microbatch order): a quick score."""
    ix = Indexed(graph, costs)
    return list_schedule(ix, priority_ranks(ix, default_priority(graph)),
                         Policy("dip", lambda op: (), memory_cap=memory_cap))[1]


def search(graph: Graph, costs: Costs, budget_seconds: float = 1.0, rollouts: int | None = None,
           seed: int = 0, memory_cap: float | None = None) -> tuple[Plan, SearchStats]:
    """Best plan found within `budget_seconds` (or exactly `rollouts` rollouts, deterministic)."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    lanes = _groups(graph)
    ix = Indexed(graph, costs)
    within = _within_group_ranks(ix)
    group_of = [(op.module, op.mb) for op in ix.ops]
    policy = Policy("dip", lambda op: (), alternate=True, memory_cap=memory_cap)
    cache: dict[tuple, float] = {}

    def evaluate(choices: list[int]):
        key = tuple(choices)
        if key in cache:                     # a repeated sequence cannot beat the best
            return None, cache[key]
        rank = {g: k for k, g in enumerate(_sequence(lanes, choices))}
        order, t = list_schedule(ix, [rank[group_of[i]] * ix.n + within[i] for i in range(ix.n)], policy)
        cache[key] = t
        return order, t

    default = []
    open_, pos = _open_lanes(lanes, [])
    while open_:                                     # microbatch order, graph order within one
        c = min(open_, key=lambda i: (lanes[i][pos[i]][1], i))
        default.append(c)
        pos[c] += 1
        if pos[c] == len(lanes[c]):
            open_.remove(c)
    best_order, best_t = evaluate(default)
    stats = SearchStats(rollouts=1, default_seconds=best_t)
    t_ref = best_t
    root = _Node()
    depth_max = len(default)
    done = lambda: (stats.rollouts >= rollouts) if rollouts is not None else \
        (time.perf_counter() - t0 >= budget_seconds)
    while not done():
        # selection
        node, prefix, path = root, [], [root]
        while True:
            open_, _ = _open_lanes(lanes, prefix)
            if not open_ or len(prefix) >= depth_max:
                break
            unvisited = [c for c in open_ if c not in node.children]
            if unvisited:
                c = unvisited[0]
                node.children[c] = _Node()
                node, prefix = node.children[c], prefix + [c]
                path.append(node)
                break
            c = max(open_, key=lambda c: node.children[c].best ** ALPHA +
                    BETA * math.sqrt(math.log(max(1, node.visits)) / max(1, node.children[c].visits)))
            node, prefix = node.children[c], prefix + [c]
            path.append(node)
        # rollout from the new node
        choices = _complete(lanes, prefix, rng)
        order, t = evaluate(choices)
        stats.rollouts += 1
        if t < best_t:
            best_order, best_t = order, t
        score = t_ref / t
        for n in path:
            n.visits += 1
            n.best = max(n.best, score)
        if not _open_lanes(lanes, prefix)[0]:
            break                                   # the whole space is one sequence
    stats.seconds = time.perf_counter() - t0
    stats.best_seconds = best_t
    return ix.plan(best_order, "dip"), stats


_SHARED: tuple | None = None      # (graph, costs, budget, rollouts, memory_cap) for forked workers


def _worker(seed: int):
    graph, costs, budget, rollouts, cap = _SHARED
    plan, stats = search(graph, costs, budget, rollouts, seed, cap)
    return plan.order, stats


def parallel_search(graph: Graph, costs: Costs, workers: int, budget_seconds: float = 1.0,
                    rollouts: int | None = None, seed: int = 0, memory_cap: float | None = None
                    ) -> tuple[Plan, SearchStats]:
    """Independent searches with seeds seed..seed+workers-1 in forked processes; the best wins
    (ties: the lowest seed), so the result is deterministic for a rollout budget."""
    if workers <= 1:
        return search(graph, costs, budget_seconds, rollouts, seed, memory_cap)
    import multiprocessing as mp
    global _SHARED
    t0 = time.perf_counter()
    _SHARED = (graph, costs, budget_seconds, rollouts, memory_cap)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_worker, [seed + k for k in range(workers)])
    finally:
        _SHARED = None
    order, best = min(results, key=lambda r: r[1].best_seconds)
    stats = SearchStats(rollouts=sum(s.rollouts for _, s in results), seconds=time.perf_counter() - t0,
                        default_seconds=best.default_seconds, best_seconds=best.best_seconds)
    return Plan(graph, order, "dip"), stats
