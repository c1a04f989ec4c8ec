"""The schedule IR: ops, the dependency graph of one batch, per-rank op orders (validation: validate.py).

A module with `chunks` chunks places chunk c on rank c % P. Sub-microbatch `sub` of module
`module` in microbatch `mb` runs forward through chunks 0..chunks-1 and backward in reverse.
Across modules, by role (dip_jax.specs): every encoder forward of microbatch m precedes the
backbone's forward of m; the backbone's last forward precedes each generator sub-microbatch's
forward; backward mirrors this. A partition made of "mixed" chunks (layers of several modules,
Megatron-style) is one module named "mixed" with no role.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable

F, B = "F", "B"
ENCODER, BACKBONE, GENERATOR = "encoder", "backbone", "generator"     # as in dip_jax.specs


class ScheduleError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclasses.dataclass(frozen=True, order=True)
class Op:
    kind: str
    module: str
    chunk: int
    mb: int
    sub: int = 0

    def __str__(self) -> str:
        return f"{self.kind}({self.module}[{self.chunk}] mb{self.mb}.{self.sub})"


@dataclasses.dataclass(frozen=True)
class ModuleChunks:
    name: str
    chunks: int                      # P * K
    layers: tuple[int, ...]          # layers per chunk (a mixed chunk: total layers)
    backward: bool = True            # False for frozen leading modules
    unit: int = 1                    # sub-microbatch size B_i (items per sub-microbatch)
    role: str = ""                   # encoder / backbone / generator; by default the registered spec's

    def __post_init__(self):
        if not self.role:
            from dip_jax.specs import role_of      # pure Python: the IR still imports no planner
            object.__setattr__(self, "role", role_of(self.name))


@dataclasses.dataclass(frozen=True)
class Graph:
    """Everything that must run for one batch: P, the chunked modules in graph order
    (encoders, llm, dit, or one "mixed"), and the sub-microbatch count of each (mb, module)."""

    P: int
    modules: tuple[ModuleChunks, ...]
    subs: tuple[tuple[int, ...], ...]            # [mb][module index]

    def __post_init__(self):
        object.__setattr__(self, "_index", {m.name: i for i, m in enumerate(self.modules)})
        object.__setattr__(self, "encoders", tuple(m.name for m in self.modules if m.role == ENCODER))
        one = lambda role: next((m.name for m in self.modules if m.role == role), None)
        object.__setattr__(self, "backbone", one(BACKBONE))
        object.__setattr__(self, "generator", one(GENERATOR))

    @property
    def microbatches(self) -> int:
        return len(self.subs)

    def module(self, name: str) -> ModuleChunks:
        return self.modules[self._index[name]]

    def n_subs(self, module: str, mb: int) -> int:
        return self.subs[mb][self._index[module]]

    def rank(self, op: Op) -> int:
        return op.chunk % self.P

    def ops(self) -> list[Op]:
        out = []
        for mb in range(self.microbatches):
            for m in self.modules:
                for sub in range(self.n_subs(m.name, mb)):
                    for c in range(m.chunks):
                        out.append(Op(F, m.name, c, mb, sub))
                        if m.backward:
                            out.append(Op(B, m.name, c, mb, sub))
        return out

    def preds(self, op: Op) -> list[Op]:
        m = self.module(op.module)
        last = m.chunks - 1
        bb, gen = self.backbone, self.generator
        if op.kind == F:
            if op.chunk > 0:
                return [Op(F, op.module, op.chunk - 1, op.mb, op.sub)]
            if m.role == BACKBONE:
                return [Op(F, e, self.module(e).chunks - 1, op.mb, s) for e in self.encoders
                        for s in range(self.n_subs(e, op.mb))]
            if m.role == GENERATOR and bb is not None:
                return [Op(F, bb, self.module(bb).chunks - 1, op.mb, 0)]
            return []
        if op.chunk < last:
            return [Op(B, op.module, op.chunk + 1, op.mb, op.sub)]
        out = [Op(F, op.module, last, op.mb, op.sub)]
        if m.role == BACKBONE and gen is not None and self.module(gen).backward:
            out += [Op(B, gen, 0, op.mb, s) for s in range(self.n_subs(gen, op.mb))]
        if m.role == ENCODER and bb is not None and self.module(bb).backward:
            out.append(Op(B, bb, 0, op.mb, 0))
        return out

    def to_json(self) -> dict:
        return {"P": self.P, "modules": [dataclasses.asdict(m) for m in self.modules],
                "subs": [list(s) for s in self.subs]}

    @classmethod
    def from_json(cls, d: dict) -> "Graph":
        """Plans written before modules carried their role get it from the spec registry."""
        mods = tuple(ModuleChunks(m["name"], m["chunks"], tuple(m["layers"]), m["backward"], m["unit"], m.get("role", ""))
                     for m in d["modules"])
        return cls(d["P"], mods, tuple(tuple(s) for s in d["subs"]))


@dataclasses.dataclass(frozen=True)
class Plan:
    """One batch's schedule: the graph, each rank's op order and the memory strategy per op.

    `stored`: the forward ops that keep their chunk's residuals until the backward, which then
    applies them without recomputing; every other backward recomputes its chunk's forward from
    the chunk's stashed input (the default: nothing stored)."""

    graph: Graph
    order: tuple[tuple[Op, ...], ...]
    scheduler: str = ""
    stored: frozenset = frozenset()

    def strategy(self, op: Op) -> str:
        """'store' or 'recompute', of a forward op or the backward of the same chunk."""
        return "store" if Op(F, op.module, op.chunk, op.mb, op.sub) in self.stored else "recompute"

    def to_json(self) -> dict:
        enc = lambda o: [o.kind, o.module, o.chunk, o.mb, o.sub]
        return {"scheduler": self.scheduler, "graph": self.graph.to_json(),
                "order": [[enc(o) for o in r] for r in self.order], "stored": [enc(o) for o in sorted(self.stored)]}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        dec = lambda x: Op(*x)
        return cls(Graph.from_json(d["graph"]), tuple(tuple(dec(o) for o in r) for r in d["order"]),
                   d.get("scheduler", ""), frozenset(dec(o) for o in d.get("stored", ())))

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def by_rank(graph: Graph, ops: Iterable[Op]) -> tuple[tuple[Op, ...], ...]:
    lists: list[list[Op]] = [[] for _ in range(graph.P)]
    for op in ops:
        lists[graph.rank(op)].append(op)
    return tuple(tuple(l) for l in lists)

