"""Planning ahead: each batch's metadata goes to background planner processes while the
accelerators run earlier batches; a plan that is late or fails is replaced by interleaved 1F1B.

Imports no jax, so the worker processes start quickly and stay small.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import multiprocessing
import multiprocessing.pool
import time
from typing import Sequence

from dip_jax.config import TrainConfig
from dip_jax.plan.memory import stored_fraction
from dip_jax.plan.schedule import Plan
from dip_jax.plan.schedulers import PlanContext
from dip_jax.plan.simulate import Timeline
from dip_jax.train.interrupt import ignore_interrupts

FALLBACK = "interleaved_1f1b"


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    plan: Plan
    timeline: Timeline            # lock-step: what the executor does
    plan_seconds: float


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The plans of one batch (one per data replica) and how they were obtained."""
    step: int
    scheduler: str                # the scheduler that made them (FALLBACK after a fallback)
    replicas: tuple[ReplicaPlan, ...]
    order: tuple[int, ...]        # microbatch i of the step is the batch's microbatch order[i]
    fallback: str | None = None   # why the configured scheduler's plans were not used
    wait_seconds: float = 0.0     # how long the step loop waited for them

    @property
    def slowest_index(self) -> int:
        """The replica whose plan sets the step time."""
        return max(range(len(self.replicas)), key=lambda r: self.replicas[r].timeline.iteration_seconds)

    @property
    def slowest(self) -> ReplicaPlan:
        return self.replicas[self.slowest_index]

    @property
    def plans(self) -> list[Plan]:
        return [r.plan for r in self.replicas]

    def to_json(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler, "fallback": self.fallback,
                "wait_seconds": self.wait_seconds, **planned_to_json((self.order, self.replicas))}

    @classmethod
    def from_json(cls, d: dict) -> "BatchPlan":
        order, replicas = planned_from_json(d)
        return cls(d["step"], d["scheduler"], replicas, order, d["fallback"], d["wait_seconds"])

    def fields(self) -> dict:
        """The plan fields of a metrics line."""
        t = self.slowest.timeline
        return {"scheduler": self.scheduler, "predicted_step_seconds": t.iteration_seconds,
                "lower_bound_seconds": t.lower_bound_seconds, "bubble_fraction": t.bubble_fraction,
                "plan_seconds": sum(r.plan_seconds for r in self.replicas), "plan_fallback": self.fallback is not None,
                "plan_fallback_reason": self.fallback, "plan_wait_seconds": self.wait_seconds,
                "stored_fraction": statistics.fmean(stored_fraction(r.plan) for r in self.replicas),
                "predicted_peak_gb": max(max(r.timeline.peak_memory) for r in self.replicas) / 1e9}


def planned_to_json(planned) -> dict:
    """(order, replicas) of `plan_batch` as plain JSON."""
    order, replicas = planned
    return {"order": list(order), "replicas": [{"plan": r.plan.to_json(), "timeline": r.timeline.to_json(),
                                                "plan_seconds": r.plan_seconds} for r in replicas]}


def planned_from_json(d: dict):
    return tuple(d["order"]), tuple(ReplicaPlan(Plan.from_json(r["plan"]), Timeline.from_json(r["timeline"]),
                                                r["plan_seconds"]) for r in d["replicas"])


def plan_batch(ctx: PlanContext, step: int, metadata: Sequence, scheduler: str, forward_only: bool = False
               ) -> tuple[tuple[int, ...], tuple[ReplicaPlan, ...]]:
    """(microbatch order, plans): the batch's microbatches are spread over the data replicas by
    predicted time, then each replica's share is planned. DIP's search is seeded by the step,
    so a rollout budget makes both a pure function of (config, batch, step)."""
    D = ctx.cfg.mesh.data
    order = ctx.replica_order(metadata)
    per = len(order) // D
    out = []
    for r in range(D):
        mbs = [metadata[i] for i in order[r * per:(r + 1) * per]]
        res = ctx.plan(mbs, scheduler, runtime=True, rollouts=ctx.cfg.pipeline.search_rollouts, seed=step,
                       forward_only=forward_only)
        out.append(ReplicaPlan(res.plan, res.lockstep, res.plan_seconds))
    return order, tuple(out)


def reorder(arrays: dict, order: Sequence[int]) -> dict:
    """Collated arrays (microbatch-major) in the given microbatch order; scalars as they are."""
    idx = list(order)
    return {k: v[idx] if getattr(v, "ndim", 0) else v for k, v in arrays.items()}


# -- worker processes ---------------------------------------------------------------------
_CTX: PlanContext | None = None


def _init_worker(cfg: TrainConfig, partition, residuals) -> None:
    global _CTX
    ignore_interrupts()                      # Ctrl-C reaches the whole process group; the trainer decides
    _CTX = PlanContext(cfg, partition=partition)
    _CTX.cost.residuals = residuals


def _plan_in_worker(step: int, metadata, fault: str | None):
    if fault == "raise":
        raise RuntimeError(f"planner fault injected at step {step}")
    if fault == "late":
        time.sleep(3600.0)                   # a search that never ends in time
    # JSON text back to the parent: results are plain data, never objects built by the worker
    return json.dumps(planned_to_json(plan_batch(_CTX, step, metadata, _CTX.cfg.pipeline.schedule)))


class Planner:
    """Plans batches of `cfg.pipeline.schedule` on `plan_workers` processes (0: inline).

    `submit(step, metadata)` as soon as a batch is fetched; `get(step, metadata)` when it is
    about to run. `get` waits at most `plan_deadline_seconds`; then it plans interleaved 1F1B
    in this process (milliseconds), says why, and replaces the workers, since a worker stuck
    on one batch would make every later plan late too.
    """

    def __init__(self, cfg: TrainConfig, ctx: PlanContext | None = None):
        """`ctx`: the context to plan with (its partition and measured residuals reach the workers)."""
        self.cfg = cfg
        self.ctx = ctx or PlanContext(cfg)
        self.faults = dict(cfg.pipeline.plan_faults)
        self.requests: dict[int, Sequence] = {}
        self.jobs: dict[int, multiprocessing.pool.AsyncResult] = {}
        self.pool = None
        if cfg.pipeline.plan_workers > 0:
            self._start()

    def _start(self) -> None:
        # spawn, not fork: the parent runs XLA threads, which fork would copy mid-flight
        self.pool = multiprocessing.get_context("spawn").Pool(self.cfg.pipeline.plan_workers, _init_worker,
                                                              (self.cfg, self.ctx.partition, self.ctx.cost.residuals))
        self.jobs = {step: self._send(step, md) for step, md in self.requests.items()}

    def _send(self, step: int, metadata: Sequence):
        return self.pool.apply_async(_plan_in_worker, (step, metadata, self.faults.pop(step, None)))

    def submit(self, step: int, metadata: Sequence) -> None:
        self.requests[step] = metadata
        if self.pool is not None:
            self.jobs[step] = self._send(step, metadata)

    def get(self, step: int, metadata: Sequence) -> BatchPlan:
        t0 = time.perf_counter()
        scheduler, reason, planned = self.cfg.pipeline.schedule, None, None
        deadline = self.cfg.pipeline.plan_deadline_seconds
        try:
            if self.requests.pop(step, None) is None:
                raise LookupError(f"no plan was requested for step {step}")
            if self.pool is None:
                if self.faults.pop(step, None) == "raise":
                    raise RuntimeError(f"planner fault injected at step {step}")
                planned = plan_batch(self.ctx, step, metadata, scheduler)
            else:
                planned = planned_from_json(json.loads(self.jobs.pop(step).get(timeout=deadline)))
        except multiprocessing.TimeoutError:
            reason = f"deadline: no {scheduler} plan after {deadline:g} s"
            self.pool.terminate()
            self._start()
        except Exception as e:                       # a planner bug must not stop training
            reason = f"error: {type(e).__name__}: {e}"
        if reason is not None:
            scheduler, planned = FALLBACK, plan_batch(self.ctx, step, metadata, FALLBACK)
        order, replicas = planned
        return BatchPlan(step, scheduler, replicas, order, reason, time.perf_counter() - t0)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None
