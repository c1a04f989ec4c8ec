"""Which microbatches each data replica trains: balanced by predicted time (DESIGN.md §5).

Every replica runs its own plan inside one lock-step program, so a step lasts as long as the
slowest replica's plan; spreading the heavy microbatches evens the replicas out.
"""
from __future__ import annotations


def balance(seconds: list[float], replicas: int) -> list[int]:
    """A permutation of microbatch indices: replica r trains positions [r*M/R, (r+1)*M/R).

    Longest first, each to the least-loaded replica with room (every replica takes M/R);
    within a replica the original order is kept. Ties keep the given order, so the result is
    deterministic.
    """
    n = len(seconds)
    if replicas <= 1 or n % replicas:
        return list(range(n))
    per = n // replicas
    load, members = [0.0] * replicas, [[] for _ in range(replicas)]
    for i in sorted(range(n), key=lambda i: (-seconds[i], i)):
        r = min((r for r in range(replicas) if len(members[r]) < per), key=lambda r: (load[r], r))
        members[r].append(i)
        load[r] += seconds[i]
    return [i for m in members for i in sorted(m)]
