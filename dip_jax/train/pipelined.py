"""The pipelined train step: plan each replica's microbatches, run the cached executor.

Planning here is synchronous (one plan per step, before it runs); background planning ahead of
the step loop is the next piece. Every scheduler runs on DIP's modality chunks.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import optax

from dip_jax.config import TrainConfig
from dip_jax.data.collate import Batch
from dip_jax.plan.schedulers import PlanContext
from dip_jax.runtime.pipeline import PipelineExecutor


@dataclasses.dataclass
class StepReport:
    scheduler: str
    predicted_step_seconds: float
    lower_bound_seconds: float
    bubble_fraction: float
    plan_seconds: float
    compiles: int
    cache_hits: int

    def fields(self) -> dict:
        return {**dataclasses.asdict(self), "plan_fallback": False}


class PipelinedStep:
    def __init__(self, cfg: TrainConfig, model, mesh, tx):
        self.cfg, self.tx = cfg, tx
        self.ctx = PlanContext(cfg)
        d = cfg.data
        self.executor = PipelineExecutor(model, self.ctx.partition, mesh,
                                         {"vision": d.max_images, "audio": d.max_audio_clips, "dit": d.max_video_clips},
                                         d.seq_len, cfg.pipeline.step_cache_size,
                                         cfg.pipeline.compile_cache_dir or None)
        self.replicas = cfg.mesh.data
        self._apply = jax.jit(functools.partial(_apply, tx), donate_argnums=0)

    def plans(self, batch: Batch, step: int):
        M = len(batch.metadata) // self.replicas
        return [self.ctx.plan(batch.metadata[r * M:(r + 1) * M], self.cfg.pipeline.schedule, runtime=True,
                              rollouts=self.cfg.pipeline.search_rollouts, seed=step) for r in range(self.replicas)]

    def __call__(self, state, batch: Batch, step: int):
        results = self.plans(batch, step)
        loss, grads = self.executor.value_and_grad(state["params"], batch.arrays, [r.plan for r in results])
        state, grad_norm = self._apply(state, grads)
        slowest = max(results, key=lambda r: r.lockstep.iteration_seconds)
        stats = self.executor.cache.stats
        report = StepReport(self.cfg.pipeline.schedule, slowest.lockstep.iteration_seconds,
                            slowest.lockstep.lower_bound_seconds, slowest.lockstep.bubble_fraction,
                            sum(r.plan_seconds for r in results), stats.compiled, stats.hits)
        return state, {"loss": loss, "grad_norm": grad_norm}, report


def _apply(tx, state, grads):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1, "rng": state["rng"]}
    return new, optax.tree.norm(grads)
