"""A batch's ops as integer ids with flat per-op arrays: what the interleaver, the simulator
and the search loop run on (hashing Op dataclasses dominated their time)."""
from __future__ import annotations

from dip_jax.plan.schedule import B, F, Graph, Op, Plan
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dip_jax.plan.simulate import Costs


class Indexed:
    def __init__(self, graph: Graph, costs: Costs):
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

    def order_ids(self, plan: Plan) -> list[list[int]]:
        return [[self.id[op] for op in ops] for ops in plan.order]

    def plan(self, order: list[list[int]], scheduler: str) -> Plan:
        return Plan(self.graph, tuple(tuple(self.ops[i] for i in r) for r in order), scheduler)
