"""The training loop: data -> step -> metrics, checkpoints and evaluation.

`run(cfg, workdir)` is what the CLI calls and what tests and notebooks call directly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from dip_jax.config import TrainConfig
from dip_jax.data.pipeline import batch_dataset, train_iterator
from dip_jax.runtime.mesh import mesh_for
from dip_jax.train.checkpoint import Checkpointer
from dip_jax.train.evaluate import greedy_accuracy
from dip_jax.train.metrics import MetricsWriter
from dip_jax.train.state import count_params, init_state
from dip_jax.train.step import make_eval_loss, make_logits_fn, make_train_step, put_batch, replicated


PLAN_FIELDS = ("scheduler", "predicted_step_seconds", "lower_bound_seconds", "bubble_fraction", "plan_seconds",
               "plan_fallback", "compiles", "cache_hits")


def _eval_batch_count(cfg: TrainConfig, probe) -> int:
    per_batch = max(1, sum(len(mb) for mb in probe.metadata))
    return max(1, math.ceil(cfg.data.eval_samples / per_batch))


class Evaluator:
    def __init__(self, cfg: TrainConfig, graphdef, mesh):
        self.cfg, self.mesh = cfg, mesh
        source = batch_dataset(cfg, "eval")
        first = source[0]
        self.batches = [first] + [source[i] for i in range(1, _eval_batch_count(cfg, first))]
        self.loss_fn = make_eval_loss(graphdef)
        self.logits_fn = make_logits_fn(graphdef)

    def __call__(self, params) -> dict[str, float]:
        put = lambda arrays: put_batch(arrays, self.mesh)
        losses = [float(self.loss_fn(params, put(b.arrays))) for b in self.batches]
        out = {"eval_loss": float(np.mean(losses))}
        if self.cfg.data.task == "digits":
            out.update(greedy_accuracy(self.logits_fn, params, self.batches, put))
        return out


def run(cfg: TrainConfig, workdir: str | pathlib.Path) -> dict:
    """Train (resuming from `workdir`'s latest checkpoint if there is one). Returns the summary."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    mesh = mesh_for(cfg)

    graphdef, state, tx = init_state(cfg)
    state = jax.device_put(state, replicated(mesh))
    data = train_iterator(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint) if cfg.checkpoint.enabled else None
    start = 0
    if ckpt is not None:
        state, restored = ckpt.restore(state, data)
        start = restored or 0
    if cfg.pipeline.schedule == "none":
        reference = make_train_step(graphdef, tx)
        step_fn = lambda state, batch, step: (*reference(state, put_batch(batch.arrays, mesh)), None)
    else:
        from dip_jax.train.pipelined import PipelinedStep
        step_fn = PipelinedStep(cfg, nnx.merge(graphdef, state["params"]), mesh, tx)
    evaluator = Evaluator(cfg, graphdef, mesh) if (cfg.train.eval_every or cfg.data.task == "digits") else None
    log = MetricsWriter(workdir, cfg.train.steps, start, cfg.train.progress)
    print(f"dip_jax: {cfg.model.name}, {count_params(state['params']):,} params, {len(mesh.devices.flat)} devices "
          f"{dict(mesh.shape)}, steps {start}->{cfg.train.steps}, workdir {workdir}", flush=True)

    t_start, first_loss, last = time.perf_counter(), None, {}
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch = next(data)
            state, metrics, report = step_fn(state, batch, step)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics = {k: float(v) for k, v in metrics.items()}
                plan = report.fields() if report is not None else dict.fromkeys(PLAN_FIELDS)
                last = log.write("train", step, step_seconds=time.perf_counter() - t0, batch_index=batch.index,
                                 samples=sum(len(mb) for mb in batch.metadata), **metrics, **plan)
                first_loss = metrics["loss"] if first_loss is None else first_loss
                log.progress(step, loss=metrics["loss"])
            if evaluator is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 \
                    and step != cfg.train.steps:
                log.write("eval", step, **evaluator(state["params"]))
            if ckpt is not None:
                ckpt.save(step, state, data, force=step == cfg.train.steps)
        final_eval = log.write("eval", cfg.train.steps, **evaluator(state["params"])) if evaluator else {}
    finally:
        log.close()
        if ckpt is not None:
            ckpt.close()
    summary = {"steps": cfg.train.steps, "resumed_from": start, "wall_seconds": time.perf_counter() - t_start,
               "first_loss": first_loss, "last_loss": last.get("loss"), **{k: v for k, v in final_eval.items()
                                                                            if k.startswith("eval")}}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("dip_jax: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()),
          flush=True)
    return summary
