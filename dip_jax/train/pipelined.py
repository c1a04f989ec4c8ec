"""The pipelined train step: a batch and its plans (one per replica) in, the updated state out.

Every scheduler runs on DIP's modality chunks; plans come from `train.planning`. The state is
in the executor's stage layout (`layouts`), and a step is one compiled program. Evaluation
runs through the same executor with forward-only plans.
"""
from __future__ import annotations

from dip_jax import specs
from dip_jax.config import TrainConfig
from dip_jax.data.collate import Batch
from dip_jax.runtime.pipeline import PipelineExecutor
from dip_jax.train.planning import BatchPlan, plan_batch, reorder


class PipelinedStep:
    def __init__(self, cfg: TrainConfig, model, mesh, tx, ctx, executor: PipelineExecutor | None = None):
        """`model`: the LMM (abstract is enough: only its structure is read). `executor`: one
        already built on this mesh and optimizer (calibration's, compiled step included); used
        when its partition is `ctx`'s."""
        self.cfg, self.ctx = cfg, ctx
        d = cfg.data
        zero = cfg.optim.shard_state_over_data
        reuse = (executor is not None and executor.partition == ctx.partition and executor.zero == zero
                 and executor.remat == cfg.pipeline.remat)
        self.executor = executor if reuse else PipelineExecutor(model, ctx.partition, mesh,
                                         specs.max_items(cfg.model, d),
                                         d.seq_len, cfg.pipeline.step_cache_size,
                                         cfg.pipeline.compile_cache_dir or None, tx=tx,
                                         shard_state_over_data=zero, remat=cfg.pipeline.remat)
        self.layouts = dict(self.executor.layouts)
        self._eval_plans: dict[int, tuple] = {}     # eval batch index -> (order, plans): fixed batches

    def __call__(self, state, batch: Batch, plan: BatchPlan):
        return self.executor.train_step(state, reorder(batch.arrays, plan.order), plan.plans)

    def eval_loss(self, params, batch: Batch):
        """Held-out loss of one batch through the executor (forward-only plans, no gradients)."""
        if batch.index not in self._eval_plans:
            order, replicas = plan_batch(self.ctx, batch.index, batch.metadata, self.cfg.pipeline.schedule,
                                         forward_only=True)
            self._eval_plans[batch.index] = order, [r.plan for r in replicas]
        order, plans = self._eval_plans[batch.index]
        return self.executor.stage_loss(params, reorder(batch.arrays, order), plans)

    def residual_profile(self, state) -> dict:
        """The bytes a stored op keeps per module (`PipelineExecutor.residual_profile`), on the
        config's first batch (any plan of it: only the shapes count). `state`: shapes suffice."""
        from dip_jax.data.pipeline import PackedBatches
        batch = PackedBatches(self.cfg).build(0, rows=())      # shapes only: the files task decodes nothing
        order, replicas = plan_batch(self.ctx, 0, batch.metadata, "gpipe")
        return self.executor.residual_profile(state, reorder(batch.arrays, order), [r.plan for r in replicas])

    def model_params(self, params):
        """Stage-layout params -> the model layout (greedy decoding runs the unpipelined model)."""
        return self.executor.to_model(params)

    @property
    def cache_fields(self) -> dict:
        stats = self.executor.cache.stats
        return {"compiles": stats.compiled, "cache_hits": stats.hits, "compiled_peak_gb": stats.peak_bytes / 1e9}
