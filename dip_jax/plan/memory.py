"""The memory strategy of each op pair, chosen per batch after the schedule is fixed (paper §5.3).

A forward op either keeps only its chunk's input and its backward recomputes the chunk
("recompute"), or keeps the chunk's residuals and its backward applies them ("store": one
forward less, more bytes alive from the forward to the end of the backward). Per rank this is a
0-1 knapsack with a time-indexed memory constraint, on the recompute-only lock-step timeline:

    maximise   sum_i s_i x_i                    s_i: time the backward of pair i saves when stored
    subject to base(e) + sum_i a_ie x_i <= cap  for every allocation event e of the rank

where base(e) is the rank's memory right after event e with nothing stored and a_ie the extra
bytes of pair i while it is alive at e (its residuals less its stashed input, from its forward
to the end of its backward; at its backward's start also the recompute transient it no longer
needs, a negative term). The runtime decides per chunk op (all of a chunk's layers store or none
do), so each pair has two candidates and the multiple-choice knapsack of the paper is a 0-1 one.

Solved by a greedy pass (best saving per byte first; a pair goes in when every event it spans
keeps slack), whose result is accepted when it is within GAP of the LP relaxation's bound on the
rank's op time (HiGHS); otherwise HiGHS's branch and bound runs (relative gap GAP) and the
better of the two is kept. scipy's milp takes no starting solution, so the greedy one is the
fallback rather than a warm start. Shorter backwards then move later ops earlier, so the plan is
re-simulated and, where a rank's peak went over the cap, its stored pair with the least saving
per byte alive at the peak goes back to recompute, until every rank fits (or is at its
recompute-only peak, which no strategy lowers). For plans the executor runs, the compiled step's
buffers are checked too (`program_bytes`). Last, a choice whose simulated step is not faster than
recompute-only (a program with residual slots pays more per tick, as calibration measures) is
dropped: the plan recomputes everything.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from dip_jax.config import MEMORY_STRATEGIES as MODES
from dip_jax.plan import tables as T
from dip_jax.plan.indexed import Indexed
from dip_jax.plan.schedule import B, F, Op, Plan
from dip_jax.plan.simulate import Costs, simulate

GAP = 0.05
MILP_SECONDS = 0.05              # branch and bound's budget per rank (the greedy result stands when it runs out)


@dataclasses.dataclass
class Choice:
    stored: int = 0                 # op pairs stored
    pairs: int = 0                  # op pairs with a backward
    seconds: list = dataclasses.field(default_factory=list)    # per rank: time to choose
    solver: list = dataclasses.field(default_factory=list)     # per rank: "all", "greedy" or "milp"
    gap: list = dataclasses.field(default_factory=list)        # per rank: proven bound on the op-time gap
    repaired: int = 0               # pairs moved back to recompute after re-simulation

    @property
    def fraction(self) -> float:
        return self.stored / self.pairs if self.pairs else 0.0


def stored_fraction(plan: Plan) -> float:
    """Share of the plan's op pairs (forward + backward of one chunk) that store."""
    pairs = sum(len([op for op in ops if op.kind == B]) for ops in plan.order)
    return len(plan.stored) / pairs if pairs else 0.0


def choose(plan: Plan, costs: Costs, cap: float, mode: str = "auto", program: bool = False) -> tuple[Plan, Choice]:
    """`plan` with its memory strategy per op: `mode` "recompute" stores nothing, "store"
    everything, "auto" what the memory cap allows (see the module docstring). `program`: the
    plan will run on the executor, whose buffers hold as many slots as the busiest rank needs,
    rounded up to a power of two, for the whole step: "auto" also keeps `program_bytes` under
    the cap (moving the longest-held stored ops of the module with the largest residual buffer
    back to recompute)."""
    if mode not in MODES:
        raise ValueError(f"unknown memory strategy {mode!r}; choose one of {', '.join(MODES)}")
    ix = Indexed(plan.graph, costs)
    pairs = [ix.pair[j] for j in range(ix.n) if ix.is_b[j]]
    if mode == "recompute" or not pairs or costs.latency_stored is None:
        # (costs without a stored backward describe no runtime that could store: mixed chunks)
        return dataclasses.replace(plan, stored=frozenset()), Choice(0, len(pairs))
    if mode == "store":
        return dataclasses.replace(plan, stored=frozenset(ix.ops[i] for i in pairs)), Choice(len(pairs), len(pairs))
    order = ix.order_ids(plan)
    # the recompute-only timeline, simulated once: the choice's events, the repair's floor and
    # the final comparison all read it
    none = simulate(dataclasses.replace(plan, stored=frozenset()), costs, "lockstep", ix)
    full = ix.with_stored([ix.ops[i] for i in pairs])
    arr = _Arrays(ix, full, [none.start[op] for op in ix.ops], [none.end[op] for op in ix.ops])
    choice = Choice(pairs=len(pairs))
    everything = frozenset(ix.ops[i] for i in pairs)
    if max(simulate(dataclasses.replace(plan, stored=everything), costs, "lockstep", ix).peak_memory) <= cap:
        # room for every residual: the per-rank choice, which models memory on the recompute-only
        # timeline's events, could only hold back ops whose storing fits anyway
        stored = everything
    else:
        chosen: set[int] = set()
        for r, ids in enumerate(order):
            t0 = time.perf_counter()
            picked, solver, gap = _rank(ix, arr, r, ids, cap)
            chosen |= picked
            choice.seconds.append(time.perf_counter() - t0)
            choice.solver.append(solver)
            choice.gap.append(gap)
        stored = frozenset(ix.ops[i] for i in chosen)
        stored, choice.repaired = _repair(plan, costs, stored, cap, ix, full, none.peak_memory)
    if program:
        stored, dropped = _fit_program(plan, costs, stored, cap)
        choice.repaired += dropped
    if stored and simulate(dataclasses.replace(plan, stored=stored), costs, "lockstep", ix).iteration_seconds >= \
            none.iteration_seconds:
        # what the stored ops save does not pay for what storing costs the step (measured:
        # the residual slots' traffic in every tick): recompute everything
        choice.repaired += len(stored)
        stored = frozenset()
    choice.stored = len(stored)
    return dataclasses.replace(plan, stored=stored), choice


class _Arrays:
    """The per-op numbers the choice reads, as numpy arrays (under "recompute" and "store")."""

    def __init__(self, ix: Indexed, full: Indexed, start, end):
        self.start, self.end = np.asarray(start), np.asarray(end)
        self.pair = np.asarray(ix.pair)
        self.is_b = np.asarray(ix.is_b)
        self.lat, self.lat_st = np.asarray(ix.lat), np.asarray(full.lat)
        self.stored, self.stored_st = np.asarray(ix.stored), np.asarray(full.stored)
        self.working, self.working_st = np.asarray(ix.working), np.asarray(full.working)


def _rank(ix: Indexed, arr: _Arrays, r: int, ids: list[int], cap: float):
    """The forward ids of the pairs rank `ids` stores, the solver used and the proven gap."""
    ids = np.asarray(ids)
    J = ids[arr.is_b[ids]]                      # the rank's backwards, and their forwards
    Fw = arr.pair[J]
    save = arr.lat[J] - arr.lat_st[J]
    if not len(J) or (save <= 0).all():
        return set(), "all", 0.0
    n = len(J)
    # the rank's memory events with nothing stored, in the simulator's order (time, then
    # releases before allocations, then size): a forward's start, a backward's start, its end
    t = np.concatenate([arr.start[Fw], arr.start[J], arr.end[J]])
    kind = np.repeat([1, 1, 0], n)
    delta = np.concatenate([arr.stored[Fw], arr.working[J], -arr.working[J] - arr.stored[Fw]])
    order = np.lexsort((delta, kind, t))
    at = np.empty(3 * n, int)
    at[order] = np.arange(3 * n)
    kind = kind[order]
    base = ix.static[r] + np.cumsum(delta[order])
    # memory only rises between two releases, so the last allocation before each release (or
    # the end) is the only event that needs a constraint
    peak = np.flatnonzero((kind == 1) & np.append(kind[1:] == 0, True))
    slack = cap - base[peak]
    extra = arr.stored_st[Fw] - arr.stored[Fw]
    dwork = arr.working_st[J] - arr.working[J]
    b_ev = at[n:2 * n]
    lo, hi = np.searchsorted(peak, at[:n]), np.searchsorted(peak, at[2 * n:])
    at_b = np.searchsorted(peak, b_ev)
    at_b = np.where((at_b < len(peak)) & (peak[np.minimum(at_b, len(peak) - 1)] == b_ev), at_b, -1)
    # pairs that fit nowhere recompute; pairs whose every peak event fits all candidates store
    cand = (save > 0) & (extra + np.where(at_b >= 0, dwork, 0.0) <= _range_min(slack, lo, hi))
    E = len(peak)
    total = np.bincount(lo[cand], extra[cand], E + 1) - np.bincount(hi[cand], extra[cand], E + 1)
    binding = np.cumsum(total)[:-1] > slack
    touched = np.concatenate([[0], np.cumsum(binding)])
    contested = cand & (touched[hi] - touched[lo] > 0)
    x = cand & ~contested
    picked = lambda x: set(Fw[x].tolist())
    if not contested.any():
        return picked(x), "all", 0.0
    # the contested pairs, on the binding events only
    rows = np.flatnonzero(binding)
    ks = np.flatnonzero(contested)
    lo_c, hi_c = np.searchsorted(rows, lo[ks]), np.searchsorted(rows, hi[ks])
    at_c = np.where(at_b[ks] >= 0, np.searchsorted(rows, at_b[ks]), -1)
    at_c = np.where((at_c >= 0) & (at_c < len(rows)) & (rows[np.minimum(at_c, len(rows) - 1)] == at_b[ks]), at_c, -1)
    room = slack[rows].copy()
    sv, ex, dw = save[ks], extra[ks], dwork[ks]
    for k in np.argsort(-sv / np.maximum(ex, 1e-30), kind="stable"):    # greedy: saving per byte
        a, b, e = lo_c[k], hi_c[k], at_c[k]
        if e >= 0:
            room[e] -= dw[k]                      # (dw <= 0: the recompute transient it drops)
        if room[a:b].min() >= ex[k]:
            room[a:b] -= ex[k]
            x[ks[k]] = True
        elif e >= 0:
            room[e] += dw[k]
    busy = float(arr.lat[ids].sum())
    fixed = float(save @ (x & ~contested))
    best = fixed + float(sv @ x[ks])
    gap = lambda bound, best: max(bound - best, 0.0) / max(busy - bound, 1e-30)
    enough = (GAP * busy + best) / (1 + GAP) - fixed      # a bound this low proves the gap
    bound = fixed + _lagrangian_bound(sv, ex, dw, lo_c, hi_c, at_c, slack[rows], best - fixed, enough)
    if gap(bound, best) <= GAP:
        return picked(x), "greedy", gap(bound, best)
    from scipy.optimize import Bounds, LinearConstraint, milp
    m, E = len(ks), len(rows)
    A = _constraints(lo_c, hi_c, at_c, ex, dw, E)
    c = np.concatenate([-sv, np.zeros(E)])
    bounds = Bounds(np.concatenate([np.zeros(m), np.full(E, -np.inf)]), np.concatenate([np.ones(m), slack[rows]]))
    cons = LinearConstraint(A, np.zeros(E), np.zeros(E))
    lp = milp(c, constraints=cons, integrality=np.zeros(m + E), bounds=bounds)
    if lp.status == 0:
        bound = min(bound, fixed - lp.fun)
    if gap(bound, best) <= GAP:
        return picked(x), "greedy", gap(bound, best)
    res = milp(c, constraints=cons, integrality=np.concatenate([np.ones(m), np.zeros(E)]), bounds=bounds,
               options={"mip_rel_gap": GAP, "time_limit": MILP_SECONDS})
    if res.x is not None and fixed + float(sv @ np.round(res.x[:m])) > best:
        x[ks] = np.round(res.x[:m]).astype(bool)
        best = fixed + float(sv @ x[ks])
    return picked(x), "milp", gap(bound, best)


def _lagrangian_bound(save, extra, dwork, lo, hi, at, slack, target: float, enough: float, steps: int = 60) -> float:
    """An upper bound on the best saving of `A x <= slack` (pairs over event ranges), from the
    Lagrangian dual: for any prices p >= 0 on the events, sum_e p_e slack_e + sum_k max(0,
    save_k - (bytes pair k adds at each event) . p) bounds it. Prices follow subgradient steps
    (Polyak's, towards `target`, the greedy's saving); the lowest bound seen is returned, as soon
    as one is below `enough`."""
    scale = max(float(np.abs(extra).max()), 1.0)
    ex, dw, sl = extra / scale, dwork / scale, np.maximum(slack, 0.0) / scale
    E = len(sl)
    price = np.zeros(E)
    has = at >= 0
    best = float(save.sum())
    for _ in range(steps):
        acc = np.concatenate([[0.0], np.cumsum(price)])
        reduced = save - ex * (acc[hi] - acc[lo]) - np.where(has, dw * price[np.maximum(at, 0)], 0.0)
        take = reduced > 0
        value = float(price @ sl + reduced[take].sum())
        best = min(best, value)
        if best <= enough:
            break
        use = np.bincount(lo[take], ex[take], E + 1) - np.bincount(hi[take], ex[take], E + 1)
        load = np.cumsum(use)[:E] + np.bincount(at[take & has], dw[take & has], E)
        grad = sl - load
        norm = float(grad @ grad)
        if norm == 0.0 or value - target <= 1e-12 * max(abs(target), 1.0):
            break
        price = np.maximum(price - (value - target) / norm * grad, 0.0)
    return best


def _range_min(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(a[lo_k:hi_k]) for every k (inf where empty), by a sparse table: O(1) per range."""
    out = np.full(len(lo), np.inf)
    if not len(a):
        return out
    table = [a]
    j = 1
    while (1 << j) <= len(a):
        prev = table[-1]
        table.append(np.minimum(prev[:-(1 << (j - 1))], prev[(1 << (j - 1)):]))
        j += 1
    ok = hi > lo
    n = hi[ok] - lo[ok]
    lvl = np.floor(np.log2(n)).astype(int)
    vals = np.empty(ok.sum())
    for l in np.unique(lvl):
        sel = lvl == l
        t = table[l]
        vals[sel] = np.minimum(t[lo[ok][sel]], t[hi[ok][sel] - (1 << l)])
    out[ok] = vals
    return out


def _constraints(lo, hi, at, extra, dwork, E: int):
    """The memory the chosen pairs add after each binding event as variables y_e (bounded by
    that event's slack): y_e - y_(e-1) - (bytes pairs add or drop at e) = 0, so every pair enters
    the matrix at its interval's ends only (O(events + pairs) nonzeros, not pairs x events)."""
    from scipy.sparse import coo_matrix
    n = len(lo)
    k = np.arange(n)
    b = at >= 0
    rows = np.concatenate([lo, hi, at[b], at[b] + 1, np.arange(E), np.arange(1, E)])
    cols = np.concatenate([k, k, k[b], k[b], n + np.arange(E), n + np.arange(E - 1)])
    vals = np.concatenate([-extra, extra, -dwork[b], dwork[b], np.ones(E), -np.ones(E - 1)])
    keep = rows < E                 # a change after the last event bounds nothing
    return coo_matrix((vals[keep], (rows[keep], cols[keep])), shape=(E, n + E)).tocsr()


def _repair(plan: Plan, costs: Costs, stored: frozenset, cap: float, ix: Indexed, full: Indexed, floor: list):
    """Re-simulate with `stored`; while a rank's peak exceeds the cap (and `floor`, its
    recompute-only peak), move its pair with the least saving per byte alive at the peak back to
    recompute."""
    dropped = 0
    while stored:
        tl = simulate(dataclasses.replace(plan, stored=stored), costs, "lockstep", ix)
        over = [r for r, p in enumerate(tl.peak_memory) if p > max(cap, floor[r]) * (1 + 1e-9)]
        if not over:
            break
        r = over[0]
        t_peak = max(tl.memory_curve[r], key=lambda p: p[1])[0]
        alive = [op for op in stored if plan.graph.rank(op) == r and
                 tl.start[op] <= t_peak < tl.end[_backward(op)]]
        if not alive:
            break
        worst = min(alive, key=lambda op: _density(ix, full, op))
        stored = stored - {worst}
        dropped += 1
    return stored, dropped


def program_bytes(plan: Plan, costs: Costs) -> float:
    """Per device, what the executor's step for `plan` alone holds: the largest rank's static
    bytes, its activation, cotangent and residual slot buffers (sized as `tables.lower` sizes
    them, the trash slot included), the largest recompute transient and, when calibrated, what
    the compiled step was measured to hold beyond those (XLA's temporaries, boundary buffers,
    batch and tables: `Costs.program_extra`)."""
    need = T.needs(plan)
    g = plan.graph
    carry = {m.name: 0.0 for m in g.modules}
    res = dict(carry)
    working = 0.0
    for op in g.ops():
        if op.kind == F:
            carry[op.module] = max(carry[op.module], costs.stored(op))
            res[op.module] = max(res[op.module], costs.residual(op))
        elif Op(F, op.module, op.chunk, op.mb, op.sub) not in plan.stored:
            working = max(working, costs.working(op))
    total = max(costs.static(r) for r in range(g.P)) + working + costs.program_extra
    for m in g.modules:
        slots = T.bucket(need["stash"][m.name], T.STASH_MIN) + 1
        if m.backward:
            slots += T.bucket(need["cot"][m.name]) + 1
        total += slots * carry[m.name]
        r = T.residual_bucket(need["res"][m.name])
        total += (r + 1) * res[m.name] if r else 0.0
    return total


def _fit_program(plan: Plan, costs: Costs, stored: frozenset, cap: float):
    """Drop stored ops until `program_bytes` fits the cap (or nothing is stored)."""
    tick = T.ticks_of(plan)
    held = lambda op: tick[_backward(op)] - tick[op]
    dropped = 0
    trial = lambda st: dataclasses.replace(plan, stored=st)
    while stored and program_bytes(trial(stored), costs) > cap:
        need = T.needs(trial(stored))["res"]
        size = {m: max((costs.residual(op) for op in stored if op.module == m), default=0.0) for m in need}
        m = max(size, key=lambda m: (T.residual_bucket(need[m]) + 1) * size[m] if need[m] else 0.0)
        half = T.residual_bucket(need[m]) // 2               # the next smaller buffer (none below 2 slots)
        target = half if half >= 2 else 0
        mine = sorted((op for op in stored if op.module == m), key=held, reverse=True)
        fits = lambda k: T.needs(trial(stored - set(mine[:k])))["res"][m] <= target
        lo, hi = 1, len(mine)                                # the fewest longest-held ops to drop
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        stored = stored - set(mine[:lo])
        dropped += lo
    return stored, dropped


def _backward(op: Op) -> Op:
    return Op(B, op.module, op.chunk, op.mb, op.sub)


def _density(ix: Indexed, full: Indexed, op) -> float:
    f, j = ix.id[op], ix.id[_backward(op)]
    return (ix.lat[j] - full.lat[j]) / max(full.stored[f] - ix.stored[f], 1e-30)
