"""A batch's ops as integer ids with flat per-op arrays: what the interleaver, the simulator
and the search loop run on (hashing Op dataclasses dominated their time)."""
from __future__ import annotations

import copy
from dataclasses import astuple

from dip_jax.plan.schedule import B, F, Graph, Op, Plan


class Indexed:
    def __init__(self, graph: Graph, costs):
        # costs: a simulate.Costs (the simulator imports this module, so no import back)
        self.graph, self.costs = graph, costs
        self.ops: list[Op] = graph.ops()
        self.id = {op: i for i, op in enumerate(self.ops)}
        n = len(self.ops)
        self.n, self.P = n, graph.P
        self.rank = [graph.rank(op) for op in self.ops]
        self.is_b = [op.kind == B for op in self.ops]
        self.preds = [[self.id[p] for p in graph.preds(op)] for op in self.ops]
        self.succs: list[list[int]] = [[] for _ in range(n)]
        for i, ps in enumerate(self.preds):
            for p in ps:
                self.succs[p].append(i)
        self.lat = [costs.latency(op) for op in self.ops]
        self.p2p = [costs.p2p(op) for op in self.ops]
        backward = {m.name: m.backward for m in graph.modules}
        self.has_backward = [backward[op.module] for op in self.ops]
        self.stored = [costs.stored(op) if op.kind == F and backward[op.module] else 0.0 for op in self.ops]
        self.working = [costs.working(op) if op.kind == B else 0.0 for op in self.ops]
        # the forward op whose stored activation a backward op frees (-1 for forwards)
        self.pair = [self.id[Op(F, op.module, op.chunk, op.mb, op.sub)] if op.kind == B else -1 for op in self.ops]
        self.static = [costs.static(r) for r in range(self.P)]
        self.tick_overhead = costs.tick_overhead
        self.step_overhead = costs.step_overhead
        self.stored_ids: frozenset[int] = frozenset()

    def with_stored(self, stored) -> "Indexed":
        """These ops under the strategy "store" (`stored`: forward ops, as Plan.stored): their
        backwards' latency and working memory and their own kept bytes change."""
        ids = frozenset(self.id[op] for op in stored)
        if ids == self.stored_ids:
            return self
        out = copy.copy(self)
        c = self.costs
        base = self if not self.stored_ids else Indexed(self.graph, c)
        out.lat, out.stored, out.working = list(base.lat), list(base.stored), list(base.working)
        late = c.latency_stored or c.latency
        for i in ids:
            j = self.id[Op(B, *astuple(self.ops[i])[1:])]
            out.stored[i], out.lat[i] = c.residual(self.ops[i]), late(self.ops[i])
            out.lat[j], out.working[j] = late(self.ops[j]), c.working_stored(self.ops[j])
        out.stored_ids = ids
        if ids and c.tick_overhead_stored is not None:
            out.tick_overhead = c.tick_overhead_stored
        return out

    def order_ids(self, plan: Plan) -> list[list[int]]:
        return [[self.id[op] for op in ops] for ops in plan.order]

    def plan(self, order: list[list[int]], scheduler: str) -> Plan:
        return Plan(self.graph, tuple(tuple(self.ops[i] for i in r) for r in order), scheduler,
                    frozenset(self.ops[i] for i in self.stored_ids))
