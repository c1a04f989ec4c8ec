"""One interface for every scheduler: batch metadata in, a validated plan and its timelines out.

`runtime=True` (what the trainer executes): every scheduler runs on DIP's modality chunks and
only the op order differs. `runtime=False` (the plan CLI's comparison, as in the paper): the
Megatron baselines use parameter-balanced mixed partitions (V=1 for gpipe/1f1b, V=2 for
interleaved 1F1B) and "nnscaler" the latency-balanced static partition of the first batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from dip_jax import config, specs
from dip_jax.config import TrainConfig
from dip_jax.data.metadata import SampleMeta
from dip_jax.plan import hardware
from dip_jax.plan.baselines import BASELINES, schedule_baseline
from dip_jax.plan.cost import CostModel
from dip_jax.plan.memory import Choice, choose
from dip_jax.plan.replicas import balance
from dip_jax.plan.partition import (ModalityPartition, backward_modules, dip_partition, megatron_partition,
                                    static_best_partition)
from dip_jax.plan.schedule import Plan
from dip_jax.plan.validate import validate
from dip_jax.plan.search import default_seconds, parallel_search
from dip_jax.plan.simulate import Costs, Timeline, simulate
from dip_jax.plan.workload import Workload, workload_from_metadata

SCHEDULERS = (*config.SCHEDULERS, "nnscaler")   # nnscaler: simulated only (a mixed static partition)
MEGATRON_V = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2}


@dataclasses.dataclass
class PlanResult:
    scheduler: str
    plan: Plan
    costs: Costs
    lockstep: Timeline
    async_: Timeline
    plan_seconds: float
    oom: bool
    rollouts: int = 0
    memory: Choice | None = None

    @property
    def stored_fraction(self) -> float:
        return self.memory.fraction if self.memory is not None else 0.0

    def record(self) -> dict:
        return {"iteration_seconds": self.lockstep.iteration_seconds,
                "async_iteration_seconds": self.async_.iteration_seconds,
                "lower_bound_seconds": self.lockstep.lower_bound_seconds,
                "bubble_fraction": self.lockstep.bubble_fraction,
                "async_bubble_fraction": self.async_.bubble_fraction,
                "peak_memory_bytes": [float(x) for x in self.lockstep.peak_memory],
                "oom": self.oom, "plan_seconds": self.plan_seconds, "ticks": self.lockstep.ticks,
                "rollouts": self.rollouts, "stored_fraction": self.stored_fraction}


@dataclasses.dataclass(frozen=True)
class ReplicaOrder:
    """Which data replica trains which microbatch of a batch: `balance` of their predicted
    compute, a pure function of the batch's metadata. Plain data, so that the input pipeline
    (its worker processes included) knows each process's share of a batch before it is planned."""
    cfg: TrainConfig
    modules: tuple[tuple[str, int, float], ...]     # (name, unit, seconds of one sub-microbatch)

    def seconds(self, microbatches: Sequence[Sequence[SampleMeta]]) -> list[float]:
        work = workload_from_metadata(self.cfg, microbatches)
        return [sum(-(-work.count(mb, name) // unit) * sub for name, unit, sub in self.modules)
                for mb in range(work.microbatches)]

    def __call__(self, metadata: Sequence[Sequence[SampleMeta]]) -> tuple[int, ...]:
        """Microbatch i of the step is the batch's microbatch order[i]; replica r trains positions
        [r*M/D, (r+1)*M/D)."""
        return tuple(balance(self.seconds(metadata), self.cfg.mesh.data))


class PlanContext:
    """What stays fixed over a run: cost model, DIP partition, memory cap."""

    def __init__(self, cfg: TrainConfig, hw_profile: str | None = None, partition: ModalityPartition | None = None,
                 probe_batches: Sequence[Sequence[Sequence[SampleMeta]]] | None = None):
        """`partition`: one already chosen for this config (skips probing candidates).
        `probe_batches`: the metadata (per microbatch) of representative batches, on which
        candidate partitions are scored; by default the config's first two synthetic batches
        (when the synthetic task can describe every module of the model)."""
        self.cfg = cfg
        self.hw, calibration = hardware.resolve(hw_profile or cfg.pipeline.hardware)
        self.cost = CostModel(cfg.model, self.hw, cfg.mesh.tensor, cfg.data.seq_len, calibration)
        d = cfg.data
        max_items = specs.max_items(cfg.model, d)
        self.memory_cap = cfg.pipeline.memory_cap_gb * 1e9
        self.partition: ModalityPartition = partition or dip_partition(
            cfg.model, self.cost, cfg.mesh.pipe, max_items, cfg.optim.frozen, probe=self._probe(probe_batches))
        self.forward_partition = dataclasses.replace(
            self.partition, modules=tuple(dataclasses.replace(m, backward=False) for m in self.partition.modules))
        self._sub_seconds = {   # forward + backward of one sub-microbatch through all of a module's chunks
            m.name: sum(self.cost.op_seconds(m.name, k, L, m.unit, c == 0, c == m.chunks - 1)
                        for c, L in enumerate(self.cost.padded_layers(m.layers)) for k in (("F", "B") if m.backward else ("F",)))
            for m in self.partition.modules}
        self._static = {}

    def _probe(self, batches):
        """Scores a candidate partition on two representative batches (the same for every
        process that builds this context, so all agree on the partition)."""
        per = self.cfg.data.microbatches // self.cfg.mesh.data
        if batches is None:
            if self.cfg.data.task != "synthetic" or self.cfg.model.extra_modules:
                return None
            from dip_jax.data.stream import PackedStream
            source = PackedStream(self.cfg, content=False)
            batches = [source.metadata(i) for i in range(2)]
        works = [self.workload(b[:per]) for b in batches[:2]]
        return lambda part: sum(default_seconds(part.graph(w), part.costs(self.cost, self.cfg.model), self.memory_cap)
                                for w in works)

    def microbatch_seconds(self, microbatches: Sequence[Sequence[SampleMeta]]) -> list[float]:
        """Predicted compute of each microbatch on DIP's chunks (all ranks, forward + backward)."""
        return self.replica_order.seconds(microbatches)

    @property
    def replica_order(self) -> "ReplicaOrder":
        return ReplicaOrder(self.cfg, tuple((m.name, m.unit, self._sub_seconds[m.name]) for m in self.partition.modules))

    def workload(self, microbatches: Sequence[Sequence[SampleMeta]]) -> Workload:
        return workload_from_metadata(self.cfg, microbatches)

    def _mixed(self, scheduler: str, work: Workload):
        if scheduler not in self._static:
            P = self.cfg.mesh.pipe
            bwd = any(backward_modules(self.cfg.model, self.cfg.optim.frozen).values())
            self._static[scheduler] = (static_best_partition(self.cfg.model, self.cost, P, work, 1, bwd)
                                       if scheduler == "nnscaler" else
                                       megatron_partition(self.cfg.model, P, MEGATRON_V[scheduler], bwd))
        return self._static[scheduler]

    def plan(self, microbatches: Sequence[Sequence[SampleMeta]], scheduler: str = "dip", runtime: bool = True,
             budget_seconds: float = 1.0, rollouts: int | None = None, seed: int = 0,
             workers: int = 1, forward_only: bool = False, memory_strategy: str | None = None) -> PlanResult:
        """Plan one replica's microbatches. `forward_only` (evaluation) plans the DIP chunks with
        no backward ops; it needs `runtime=True`. `memory_strategy` (default: the config's
        pipeline.memory_strategy) chooses what each op pair stores, once the order is fixed."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        t0 = time.perf_counter()
        work = self.workload(microbatches)
        n_rollouts = 0
        if forward_only and not runtime:
            raise ValueError("forward_only plans are runtime plans (the DIP chunks)")
        if scheduler == "dip" or scheduler == "encoders_first" or (runtime and scheduler != "nnscaler"):
            part = self.forward_partition if forward_only else self.partition
            graph = part.graph(work)
            costs = part.costs(self.cost, self.cfg.model)
            if scheduler == "dip":
                plan, stats = parallel_search(graph, costs, workers, budget_seconds, rollouts, seed, self.memory_cap)
                n_rollouts = stats.rollouts
            else:
                plan = schedule_baseline(scheduler, graph, costs)
        else:
            part = self._mixed(scheduler, work)
            graph = part.graph(work)
            costs = part.costs(self.cost, self.cfg.model, work)
            plan = schedule_baseline("1f1b" if scheduler == "nnscaler" else scheduler, graph, costs)
            plan = dataclasses.replace(plan, scheduler=scheduler)
        plan, memory = choose(plan, costs, self.memory_cap, memory_strategy or self.cfg.pipeline.memory_strategy,
                              program=runtime)
        validate(plan)
        elapsed = time.perf_counter() - t0          # planning; the timelines below are reporting
        lock = simulate(plan, costs, "lockstep")
        asy = simulate(plan, costs, "async")
        oom = max(lock.peak_memory) > self.memory_cap
        return PlanResult(scheduler, plan, costs, lock, asy, elapsed, oom, n_rollouts, memory)
