"""Baseline schedulers in the same IR: GPipe, 1F1B, interleaved 1F1B, encoders first.

On a single-module graph with one sub-microbatch per microbatch (a classic pipeline, e.g. a
Megatron-style mixed partition) they emit the textbook per-rank orders. On modality chunks they
are policies of the list scheduler in interleave.py.
"""
from __future__ import annotations

from dip_jax.config import BASELINES  # noqa: F401  (the one list of scheduler names lives in config)
from dip_jax.plan.interleave import Policy, default_priority, interleave
from dip_jax.plan.schedule import B, F, Graph, Op, Plan
from dip_jax.plan.simulate import Costs


def is_classic(graph: Graph) -> bool:
    return len(graph.modules) == 1 and all(s == (1,) for s in graph.subs)


def classic_order(name: str, graph: Graph) -> Plan:
    """Textbook orders. Chunk c = v*P + rank (Megatron's interleaved placement)."""
    P, M = graph.P, graph.microbatches
    mod = graph.modules[0]
    V = mod.chunks // P
    order = []
    for r in range(P):
        if name == "gpipe":
            fw = [Op(F, mod.name, v * P + r, m) for v in range(V) for m in range(M)]
            bw = [Op(B, mod.name, v * P + r, m) for v in reversed(range(V)) for m in range(M)]
            order.append(tuple(fw + (bw if mod.backward else [])))
            continue
        if V == 1:
            fw = [Op(F, mod.name, r, m) for m in range(M)]
            bw = [Op(B, mod.name, r, m) for m in range(M)]
            warm = min(P - r - 1, M)
        else:
            if M % P:
                raise ValueError(f"interleaved 1F1B needs microbatches ({M}) divisible by P ({P})")
            fw = [Op(F, mod.name, ((k // P) % V) * P + r, (k // (P * V)) * P + k % P) for k in range(M * V)]
            bw = [Op(B, mod.name, (V - 1 - (k // P) % V) * P + r, (k // (P * V)) * P + k % P) for k in range(M * V)]
            warm = min((P - r - 1) * 2 + (V - 1) * P, M * V)
        if not mod.backward:
            order.append(tuple(fw))
            continue
        seq = fw[:warm]
        for i in range(len(fw) - warm):
            seq += [fw[warm + i], bw[i]]
        seq += bw[len(fw) - warm:]
        order.append(tuple(seq))
    return Plan(graph, tuple(order), name)


def baseline_policy(name: str, graph: Graph) -> Policy:
    P = graph.P
    prio = default_priority(graph)
    V = max(m.chunks // P for m in graph.modules)
    if name == "gpipe":
        return Policy(name, prio, alternate=False, forwards_first=True)
    if name == "1f1b":
        return Policy(name, prio, alternate=False, inflight=lambda r: P - r)
    if name == "interleaved_1f1b":
        return Policy(name, prio, alternate=False,
                      inflight=lambda r: -(-((P - r - 1) * 2 + (V - 1) * P) // V) + 1)
    if name == "encoders_first":
        pos = {m.name: i for i, m in enumerate(graph.modules)}

        def enc_first(op: Op):
            enc = op.module in graph.encoders
            if op.kind == F:
                return (0 if enc else 1, op.mb, pos[op.module], op.sub, op.chunk)
            return (1 if enc else 0, op.mb, pos[op.module], op.sub, -op.chunk)
        return Policy(name, enc_first, alternate=False, inflight=None)
    raise ValueError(f"unknown baseline scheduler {name!r}; choose one of {BASELINES}")


def schedule_baseline(name: str, graph: Graph, costs: Costs) -> Plan:
    megatron_ok = graph.modules[0].chunks == graph.P or graph.microbatches % graph.P == 0
    if is_classic(graph) and name != "encoders_first" and (name == "gpipe" or megatron_ok):
        return classic_order(name, graph)
    return interleave(graph, costs, baseline_policy(name, graph))
