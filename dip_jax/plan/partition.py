"""Partitioners: DIP's modality-aware chunks (what every scheduler runs on at run time) and
the Megatron-style mixed partitions the plan CLI compares against (simulator only).

DIP (paper §4): per module the sub-microbatch size B_i is the smallest size reaching 95% of the
best efficiency the cost model gives; T_i is the module's forward+backward time per
sub-microbatch; K_i = floor(T_i / T_min) segments, capped so every chunk keeps a layer; the
module's layers are cut into P*K_i near-equal chunks of consecutive layers, chunk c on rank c % P.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

from dip_jax import specs
from dip_jax.config import ModelConfig
from dip_jax.plan.cost import CostModel
from dip_jax.plan.schedule import F, Graph, ModuleChunks, Op
from dip_jax.plan.simulate import Costs
from dip_jax.plan.workload import Workload

EFFICIENCY_TARGET = 0.95


def split_layers(layers: int, chunks: int) -> tuple[int, ...]:
    """Near-equal consecutive split; the first `layers % chunks` chunks get one more layer."""
    if chunks > layers:
        raise ValueError(f"cannot cut {layers} layers into {chunks} chunks")
    base, extra = divmod(layers, chunks)
    return tuple(base + (1 if i < extra else 0) for i in range(chunks))


def backward_modules(model: ModelConfig, frozen: tuple[str, ...]) -> dict[str, bool]:
    """A module needs backward ops if it or anything upstream of it trains."""
    out, upstream_trains = {}, False
    for name in model.modules:
        if specs.get(name).role == specs.ENCODER:
            out[name] = name not in frozen
        else:
            out[name] = name not in frozen or upstream_trains
        upstream_trains = upstream_trains or name not in frozen
    return out


def module_layers(model: ModelConfig, name: str) -> int:
    return model.module(name).layers


def layer_params(model: ModelConfig, name: str) -> int:
    return model.module(name).block_params()


def extra_params(model: ModelConfig, name: str, first: bool, last: bool) -> int:
    spec, cfg, d = specs.get(name), model.module(name), model.width
    p = 0
    if first:
        p += spec.embed_params(cfg, d)
    if last:
        p += spec.head_params(cfg, d)
    return p


@dataclasses.dataclass(frozen=True)
class ModalityPartition:
    P: int
    modules: tuple[ModuleChunks, ...]

    def module(self, name: str) -> ModuleChunks:
        return next(m for m in self.modules if m.name == name)

    def graph(self, work: Workload) -> Graph:
        subs = tuple(tuple(math.ceil(work.count(mb, m.name) / m.unit) for m in self.modules)
                     for mb in range(work.microbatches))
        return Graph(self.P, self.modules, subs)

    def costs(self, cost: CostModel, model: ModelConfig) -> Costs:
        lat, stored, working, lat_st, res = {}, {}, {}, {}, {}
        for m in self.modules:
            n = m.chunks
            for c, L in enumerate(cost.padded_layers(m.layers)):
                for kind in ("F", "B"):
                    lat[(kind, m.name, c)] = cost.op_seconds(m.name, kind, L, m.unit, c == 0, c == n - 1)
                    lat_st[(kind, m.name, c)] = cost.op_seconds(m.name, kind, L, m.unit, c == 0, c == n - 1, "store")
                stored[(m.name, c)] = cost.stored_bytes(m.name, L, m.unit)
                res[(m.name, c)] = cost.stored_bytes(m.name, L, m.unit, "store")
                working[(m.name, c)] = cost.working_bytes(m.name, L, m.unit)
        p2p = {m.name: cost.p2p_seconds(m.name, m.unit) for m in self.modules}
        static = [0.0] * self.P
        for m in self.modules:
            for c, L in enumerate(m.layers):
                params = L * layer_params(model, m.name) + extra_params(model, m.name, c == 0, c == m.chunks - 1)
                static[c % self.P] += cost.param_bytes(params)
        return Costs(latency=lambda op: lat[(op.kind, op.module, op.chunk)],
                     p2p=lambda op: p2p[op.module],
                     stored=lambda op: stored[(op.module, op.chunk)],
                     working=lambda op: working[(op.module, op.chunk)],
                     static=lambda r: static[r],
                     tick_overhead=cost.tick_seconds() if cost.calibration is not None else max(p2p.values()),
                     step_overhead=cost.step_seconds(),
                     latency_stored=lambda op: lat_st[(op.kind, op.module, op.chunk)],
                     residual=lambda op: res[(op.module, op.chunk)],
                     working_stored=lambda op: 0.0,
                     tick_overhead_stored=cost.tick_seconds("store") if cost.calibration is not None else None,
                     program_extra=cost.calibration.program_extra_bytes if cost.calibration is not None else 0.0)


PROBED_CANDIDATES = 6


def dip_partition(model: ModelConfig, cost: CostModel, P: int, max_items: dict[str, int],
                  frozen: tuple[str, ...] = (), align: bool = True,
                  probe: Callable[[ModalityPartition], float] | None = None) -> ModalityPartition:
    """DIP's partition. B_i is the smallest size within 95% of the best efficiency (sub-microbatches
    run padded to B_i, so larger sizes waste work). With `align` (the default), the segment
    counts K_i, the llm's included, are chosen so that every module's chunk op lasts as close as
    possible to the others, because a lock-step tick lasts as long as its slowest op; among
    equally aligned choices the fewest chunks win. With a `probe` (seconds of a partition on
    representative batches), the best aligned candidates are tried and the fastest wins: how well
    chunks align is only a proxy for the lock-step time. `align=False` is the paper's rule,
    K_i = floor(T_i / T_min)."""
    bwd = backward_modules(model, frozen)
    unit, T = {}, {}
    for name in model.modules:
        if specs.get(name).role == specs.BACKBONE:
            unit[name] = 1
        else:
            cand = range(1, max(1, max_items.get(name, 1)) + 1)
            eff = {b: cost.efficiency(name, b) for b in cand}
            best = max(eff.values())
            unit[name] = min(b for b in cand if eff[b] >= EFFICIENCY_TARGET * best)
        L = module_layers(model, name)
        T[name] = cost.op_seconds(name, F, L, unit[name]) + (
            cost.op_seconds(name, "B", L, unit[name]) if bwd[name] else 0.0)
    layers = {name: module_layers(model, name) for name in model.modules}
    kmax = {name: max(1, layers[name] // P) for name in model.modules}
    if align:
        def chunk_times(name, K):
            return {T[name] * c / layers[name] for c in set(split_layers(layers[name], P * K))}

        ranked = []
        for ks in itertools.product(*(range(1, kmax[name] + 1) for name in model.modules)):
            times = set().union(*(chunk_times(name, k) for name, k in zip(model.modules, ks)))
            spread = 1.0 - min(times) / max(times)       # lock-step waste between chunk ops
            ranked.append(((round(spread, 2), sum(ks)), ks))   # then the fewest chunks
        ranked.sort()
        shortlist = [ks for _, ks in ranked[:PROBED_CANDIDATES if probe else 1]]
    else:
        t_min = min(T.values())
        shortlist = [tuple(max(1, min(int(T[name] // t_min), kmax[name])) for name in model.modules)]

    def build(ks):
        return ModalityPartition(P, tuple(
            ModuleChunks(name, P * K, split_layers(module_layers(model, name), P * K), bwd[name], unit[name],
                         specs.get(name).role)
            for name, K in zip(model.modules, ks)))

    candidates = [build(ks) for ks in shortlist]
    return candidates[0] if len(candidates) == 1 else min(candidates, key=probe)


# ---------------------------------------------------------------------------------------------
# Mixed partitions (simulator only): chunks of consecutive layers across modules.

@dataclasses.dataclass(frozen=True)
class MixedPartition:
    """P*V chunks; chunk c = v*P + r holds `segments[c]` = ((module, first layer, n layers), ...)."""

    P: int
    V: int
    segments: tuple[tuple[tuple[str, int, int], ...], ...]
    backward: bool = True

    def graph(self, work: Workload) -> Graph:
        n = self.P * self.V
        mod = ModuleChunks("mixed", n, tuple(sum(s[2] for s in seg) for seg in self.segments), self.backward, 1)
        return Graph(self.P, (mod,), tuple((1,) for _ in range(work.microbatches)))

    def chunk_seconds(self, cost: CostModel, model: ModelConfig, c: int, kind: str, items: dict) -> float:
        t = 0.0
        for name, first, n in self.segments[c]:
            L = module_layers(model, name)
            t += cost.op_seconds(name, kind, n, items[name], first == 0, first + n == L)
        return t

    def costs(self, cost: CostModel, model: ModelConfig, work: Workload) -> Costs:
        cache = {}

        def latency(op: Op) -> float:
            key = (op.kind, op.chunk, op.mb)
            if key not in cache:
                items = {m: work.count(op.mb, m) for m in work.modules}
                cache[key] = self.chunk_seconds(cost, model, op.chunk, op.kind, items)
            return cache[key]

        def boundary(op: Op) -> str:
            return self.segments[op.chunk][-1][0]

        def stored(op: Op) -> float:
            return sum(cost.stored_bytes(name, n, max(1, work.count(op.mb, name)))
                       for name, _, n in self.segments[op.chunk][:1])

        static = [0.0] * self.P
        for c, seg in enumerate(self.segments):
            for name, first, n in seg:
                L = module_layers(model, name)
                static[c % self.P] += cost.param_bytes(
                    n * layer_params(model, name) + extra_params(model, name, first == 0, first + n == L))
        p2p = lambda op: cost.p2p_seconds(boundary(op), max(1, work.count(op.mb, boundary(op))))
        return Costs(latency=latency, p2p=p2p, stored=stored,
                     working=lambda op: sum(cost.working_bytes(name, n, max(1, work.count(op.mb, name)))
                                            for name, _, n in self.segments[op.chunk]),
                     static=lambda r: static[r], tick_overhead=cost.tick_seconds(),
                     step_overhead=cost.step_seconds())


def _layer_list(model: ModelConfig):
    return [(name, i) for name in model.modules for i in range(module_layers(model, name))]


def balanced_split(weights: list[float], n: int) -> list[int]:
    """Cut `weights` into n contiguous non-empty parts: minimise the largest part, then (among
    those) maximise the smallest. Returns the n-1 cut indices. Exact DP, O(len^2 * n)."""
    W = len(weights)
    if not 1 <= n <= W:
        raise ValueError(f"cannot cut {W} layers into {n} parts")
    pre = [0.0]
    for w in weights:
        pre.append(pre[-1] + w)
    seg = lambda j, i: pre[i] - pre[j]
    inf = float("inf")
    # minimax[k][i]: best largest part cutting the first i weights into k parts
    minimax = [[inf] * (W + 1) for _ in range(n + 1)]
    minimax[0][0] = 0.0
    for k in range(1, n + 1):
        for i in range(k, W - (n - k) + 1):
            minimax[k][i] = min(max(minimax[k - 1][j], seg(j, i)) for j in range(k - 1, i))
    cap = minimax[n][W] * (1 + 1e-12)
    best = [[-inf] * (W + 1) for _ in range(n + 1)]
    arg = [[0] * (W + 1) for _ in range(n + 1)]
    best[0][0] = inf
    for k in range(1, n + 1):
        for i in range(k, W - (n - k) + 1):
            for j in range(k - 1, i):
                if seg(j, i) <= cap and best[k - 1][j] > -inf:
                    v = min(best[k - 1][j], seg(j, i))
                    if v > best[k][i]:
                        best[k][i], arg[k][i] = v, j
    cuts, i = [], W
    for k in range(n, 0, -1):
        i = arg[k][i]
        cuts.append(i)
    return sorted(cuts)[1:]


def _mixed_from_weights(model: ModelConfig, P: int, V: int, weights: list[float], backward: bool) -> MixedPartition:
    layers = _layer_list(model)
    bounds = [0, *balanced_split(weights, P * V), len(layers)]
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg: list[list] = []
        for name, i in layers[a:b]:
            if seg and seg[-1][0] == name:
                seg[-1][2] += 1
            else:
                seg.append([name, i, 1])
        chunks.append(tuple(tuple(s) for s in seg))
    return MixedPartition(P, V, tuple(chunks), backward)


def megatron_partition(model: ModelConfig, P: int, V: int = 1, backward: bool = True) -> MixedPartition:
    """Megatron-style: consecutive layers balanced by parameter count (embeddings and heads
    counted with their first/last layer)."""
    w = []
    for name, i in _layer_list(model):
        L = module_layers(model, name)
        w.append(float(layer_params(model, name) + extra_params(model, name, i == 0, i == L - 1)))
    return _mixed_from_weights(model, P, V, w, backward)


def static_best_partition(model: ModelConfig, cost: CostModel, P: int, work: Workload, V: int = 1,
                          backward: bool = True) -> MixedPartition:
    """nnScaler*-like: the contiguous split that balances latency for the representative (mean)
    batch composition, fixed for the whole run."""
    w = []
    for name, i in _layer_list(model):
        L = module_layers(model, name)
        units = max(1, round(work.mean(name)))
        w.append(sum(cost.op_seconds(name, k, 1, units, i == 0, i == L - 1) for k in ("F", "B")))
    return _mixed_from_weights(model, P, V, w, backward)
