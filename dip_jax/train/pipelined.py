"""The pipelined train step: a batch and its plans (one per replica) in, the updated state out.

Every scheduler runs on DIP's modality chunks; plans come from `train.planning`. Evaluation
runs through the same executor with forward-only plans.
"""
from __future__ import annotations

import functools

import jax
import optax

from dip_jax.config import TrainConfig
from dip_jax.data.collate import Batch
from dip_jax.runtime.pipeline import PipelineExecutor
from dip_jax.train.planning import BatchPlan, plan_batch, reorder


class PipelinedStep:
    def __init__(self, cfg: TrainConfig, model, mesh, tx, ctx):
        self.cfg, self.ctx = cfg, ctx
        d = cfg.data
        self.executor = PipelineExecutor(model, ctx.partition, mesh,
                                         {"vision": d.max_images, "audio": d.max_audio_clips, "dit": d.max_video_clips},
                                         d.seq_len, cfg.pipeline.step_cache_size,
                                         cfg.pipeline.compile_cache_dir or None)
        self._apply = jax.jit(functools.partial(_apply, tx), donate_argnums=0)
        self._eval_plans: dict[int, tuple] = {}     # eval batch index -> (order, plans): fixed batches

    def __call__(self, state, batch: Batch, plan: BatchPlan):
        loss, grads = self.executor.value_and_grad(state["params"], reorder(batch.arrays, plan.order), plan.plans)
        state, grad_norm = self._apply(state, grads)
        return state, {"loss": loss, "grad_norm": grad_norm}

    def eval_loss(self, params, batch: Batch):
        """Held-out loss of one batch through the executor (forward-only plans, no gradients)."""
        if batch.index not in self._eval_plans:
            order, replicas = plan_batch(self.ctx, batch.index, batch.metadata, self.cfg.pipeline.schedule,
                                         forward_only=True)
            self._eval_plans[batch.index] = order, [r.plan for r in replicas]
        order, plans = self._eval_plans[batch.index]
        return self.executor.loss(params, reorder(batch.arrays, order), plans)

    @property
    def cache_fields(self) -> dict:
        stats = self.executor.cache.stats
        return {"compiles": stats.compiled, "cache_hits": stats.hits}


def _apply(tx, state, grads):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1, "rng": state["rng"]}
    return new, optax.tree.norm(grads)
