"""Calibration: measure the running backend (measure.py) and keep the profile the cost model
reads; `pipeline.hardware=auto` calibrates when training starts and keeps the profile in the
workdir, keyed by backend, device kind, jax version, mesh and model config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time

import jax

from dip_jax.config import TrainConfig
from dip_jax.plan.calibrated import Calibration
from dip_jax.runtime.mesh import mesh_shape
from dip_jax.train.measure import measure_ops, measure_residuals, measure_runtime, settle


def calibrate(cfg: TrainConfig, mesh, executor, ctx, log=print) -> Calibration:
    """Measure everything on `executor` (built on `ctx.partition`) and its mesh."""
    from dip_jax.data.pipeline import PackedBatches
    from dip_jax.train.planning import plan_batch, planned_from_json, planned_to_json, reorder
    from dip_jax.train.state import create_state
    from dip_jax.runtime.distributed import broadcast_json
    part = ctx.partition
    log(f"dip_jax: calibrating on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"mesh {mesh_shape(mesh)}: ops alone")
    ops, head, acc = measure_ops(cfg, {m.name: m.unit for m in part.modules},
                                 {m.name: m.backward for m in part.modules}, log)
    batch = PackedBatches(cfg)(0)
    scheduler = cfg.pipeline.schedule if cfg.pipeline.schedule != "none" else "dip"
    # the tables' shapes must be the same on every process: process 0's plan, as in training
    lead = jax.process_index() == 0
    planned = planned_to_json(plan_batch(ctx, 1, batch.metadata, scheduler)) if lead else None
    order, replicas = planned_from_json(broadcast_json(planned))
    log("dip_jax: calibrating: the executor's step, tick and ops in the tick loop")
    state = create_state(cfg, executor.tx, mesh, executor.layouts)
    arrays, plans = reorder(batch.arrays, order), [r.plan for r in replicas]
    residuals = measure_residuals(executor, state, arrays, plans, log)
    store = cfg.pipeline.memory_strategy != "recompute"
    tick, step, surcharge, stored = measure_runtime(executor, state, arrays, plans, ops, head, log, store)
    cal = Calibration(base=ctx.hw.name, ops=ops, head=head, in_executor=surcharge, tick_seconds=tick,
                      step_seconds=step, key=profile_key(cfg, mesh), accuracy=acc, residuals=residuals,
                      tick_seconds_stored=stored[0] if stored else None, stored_delta=stored[1] if stored else {})
    state = create_state(cfg, executor.tx, mesh, executor.layouts)      # the last one was donated
    cal = settle(cal, executor, state, arrays, plans, cfg.model, ctx.hw, cfg.mesh.tensor, cfg.data.seq_len, log)
    # every process must plan with the same costs: process 0's measurements count
    return Calibration.from_json(broadcast_json(cal.to_json()))


def profile_key(cfg: TrainConfig, mesh) -> dict:
    dev = jax.devices()[0]
    model = json.loads(json.dumps(dataclasses.asdict(cfg.model), default=str))
    d = cfg.data
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "jax": jax.__version__,
            "processes": jax.process_count(), "mesh": mesh_shape(mesh),
            "model": model, "seq_len": d.seq_len, "microbatches": d.microbatches,
            "items": [d.max_images, d.max_audio_clips, d.max_video_clips], "frozen": list(cfg.optim.frozen),
            "base": base_profile(cfg), "stored_ops_measured": cfg.pipeline.memory_strategy != "recompute"}


def base_profile(cfg: TrainConfig) -> str:
    h = cfg.pipeline.hardware
    return "cpu" if h == "auto" else h


def cached_path(cfg: TrainConfig, mesh, workdir: pathlib.Path) -> pathlib.Path:
    digest = hashlib.sha256(json.dumps(profile_key(cfg, mesh), sort_keys=True).encode()).hexdigest()[:16]
    return workdir / "calibration" / f"{jax.default_backend()}-{digest}.json"


def resolve_auto(cfg: TrainConfig, workdir: pathlib.Path, mesh, model, tx, log=print):
    """cfg with `pipeline.hardware` = the workdir's calibration for this backend, mesh and
    model, measured now if there is none. Also returns the executor it was measured on (the
    trainer reuses it, with its compiled step, when the calibrated partition is the same)."""
    from dip_jax.plan.schedulers import PlanContext
    from dip_jax.runtime.distributed import broadcast_json
    from dip_jax.train.pipelined import PipelinedStep
    lead = jax.process_index() == 0
    path = cached_path(cfg, mesh, workdir)
    base = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, hardware=base_profile(cfg)))
    found = broadcast_json(path.exists() if lead else None)
    executor = None
    if found:
        if lead:
            log(f"dip_jax: calibration from {path}")
    else:
        t0 = time.perf_counter()
        ctx = PlanContext(base)
        executor = PipelinedStep(base, model, mesh, tx, ctx).executor
        cal = calibrate(base, mesh, executor, ctx, log if lead else (lambda *a: None))
        if lead:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            cal.save(tmp)
            tmp.replace(path)
            log(f"dip_jax: calibrated in {time.perf_counter() - t0:.1f} s -> {path}")
    if jax.process_count() > 1:                # the others read process 0's file, via the network
        data = broadcast_json(json.loads(path.read_text()) if lead else None)
        if not lead:
            path = path.with_name(f"{path.stem}.process{jax.process_index()}.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, hardware=str(path))), executor
