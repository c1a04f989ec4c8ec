"""Real parallel execution: every scheduler on the same batches, against one device without a pipeline.

On a CPU host: two processes, one CPU device each, each pinned to its own core (`taskset`),
gloo over loopback, mesh data=1 x pipe=2; the reference is one process pinned to one core.
On an accelerator host: one process with `--pipe` devices; the reference uses one of them.

For each batch every scheduler runs in turn (the order rotates from batch to batch, so host
noise hits all alike); a step that compiled is run again and only the second run is timed. The
reference runs the same batches twice: plain jit, and plain jit whose backward recomputes the
forward (the executor's chunks do). The cost model is calibrated first (`--hardware auto`, as
the trainer's `pipeline.hardware=auto`) unless another profile is given.

    python scripts/bench_pipeline.py --config configs/tiny_cpu.py [--config.KEY=VALUE ...] \\
        [--batches 8] [--json runs/bench_pipeline.json]

Prints a table and writes JSON: median step per scheduler, speedup over both references, DIP's
paired ratio against each baseline and the batches it won, predicted vs measured per scheduler,
and whether the predicted order of the schedulers is the measured one (ties within 3% may swap).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dip_jax.config import SCHEDULERS  # noqa: E402

TIE = 0.03


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.py")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--pipe", type=int, default=2)
    ap.add_argument("--hardware", default="auto", help="cost profile: auto (calibrate), a name or a .json")
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS))
    ap.add_argument("--json", default="runs/bench_pipeline.json")
    ap.add_argument("--workdir", default="runs/bench_pipeline", help="calibration cache and worker outputs")
    ap.add_argument("--role", default="main", choices=("main", "pipeline", "reference"))
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--coordinator", default=None)
    a, rest = ap.parse_known_args(argv)
    return a, [r for r in rest if r.startswith("--config.")]


def _config(a, overrides, pipe: int, schedule: str):
    from dip_jax.config.overrides import apply_overrides, load_config_file
    cfg = apply_overrides(load_config_file(a.config), [o[len("--config."):] for o in overrides])
    return dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, data=1, pipe=pipe),
        pipeline=dataclasses.replace(cfg.pipeline, schedule=schedule, hardware=a.hardware, plan_workers=0))


def _batches(cfg, n):
    from dip_jax.data.pipeline import PackedBatches
    source = PackedBatches(cfg)
    return [source(i) for i in range(n)]


# -- the pipelined processes ----------------------------------------------------------------
def pipeline_worker(a, overrides) -> dict:
    import jax
    from dip_jax.train.calibration import resolve_auto
    from dip_jax.plan.schedulers import PlanContext
    from dip_jax.runtime.distributed import broadcast_json
    from dip_jax.runtime.mesh import mesh_for
    from dip_jax.train.optim import build_optimizer
    from dip_jax.train.pipelined import PipelinedStep
    from dip_jax.train.planning import planned_from_json, planned_to_json, plan_batch, reorder
    from dip_jax.train.state import abstract_model, create_state

    cfg = _config(a, overrides, a.pipe, "dip")
    mesh = mesh_for(cfg)
    _, model = abstract_model(cfg)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules, mesh, staged=True)
    lead = jax.process_index() == 0
    measured_on = None
    if cfg.pipeline.hardware == "auto":
        cfg, measured_on = resolve_auto(cfg, pathlib.Path(a.workdir), mesh, model, tx)
    ctx = PlanContext(cfg)
    step = PipelinedStep(cfg, model, mesh, tx, ctx, measured_on)
    ex = step.executor
    state = create_state(cfg, tx, mesh, ex.layouts)
    schedulers = a.schedulers.split(",")
    rows = []
    for b, batch in enumerate(_batches(cfg, a.batches)):
        k = b % len(schedulers)
        for s in schedulers[k:] + schedulers[:k]:
            planned = planned_to_json(plan_batch(ctx, b + 1, batch.metadata, s)) if lead else None
            order, replicas = planned_from_json(broadcast_json(planned))
            arrays, plans = reorder(batch.arrays, order), [r.plan for r in replicas]
            seconds, compiled = None, False
            for _ in range(2):
                before = ex.cache.stats.compiled
                t0 = time.perf_counter()
                state, metrics = ex.train_step(state, arrays, plans)
                float(metrics["loss"])
                seconds = time.perf_counter() - t0
                if ex.cache.stats.compiled == before:
                    break
                compiled = True
            rows.append({"batch": b, "scheduler": s, "seconds": seconds, "recompiled": compiled,
                         "predicted": replicas[0].timeline.iteration_seconds, "ticks": replicas[0].timeline.ticks})
            if lead:
                print(f"  batch {b} {s:<17} {seconds * 1e3:9.1f} ms  predicted {rows[-1]['predicted'] * 1e3:9.1f} ms"
                      f"  ticks {rows[-1]['ticks']}", flush=True)
    return {"rows": rows, "hardware": cfg.pipeline.hardware, "devices": int(mesh.devices.size),
            "processes": jax.process_count(), "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


# -- one device without a pipeline ----------------------------------------------------------
def reference_worker(a, overrides) -> dict:
    import jax
    from dip_jax.runtime.mesh import mesh_for
    from dip_jax.train.optim import build_optimizer
    from dip_jax.train.state import abstract_model, create_state, model_layouts
    from dip_jax.train.step import make_train_step, put_batch

    cfg = _config(a, overrides, 1, "none")
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, hardware="cpu"))
    mesh = mesh_for(cfg)
    graphdef, _ = abstract_model(cfg)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    out = {}
    batches = _batches(cfg, a.batches)
    for name, remat in (("plain", False), ("plain_remat", True)):
        step = make_train_step(graphdef, tx, remat=remat)
        state = create_state(cfg, tx, mesh, model_layouts(cfg))
        times = []
        for i, batch in enumerate([batches[0]] + batches):       # the first run compiles
            t0 = time.perf_counter()
            state, metrics = step(state, put_batch(batch.arrays, mesh))
            float(metrics["loss"])
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = times
        print(f"  reference {name:<12} median {statistics.median(times) * 1e3:9.1f} ms", flush=True)
    return out


# -- the parent: launch, collect, compare --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(a, overrides, role: str, out: pathlib.Path, gpu: bool):
    base = [sys.executable, __file__, "--role", role, "--config", a.config, "--batches", str(a.batches),
            "--pipe", str(a.pipe), "--hardware", a.hardware, "--schedulers", a.schedulers,
            "--workdir", a.workdir, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if role == "reference":
        cpu = [] if gpu else ["taskset", "-c", "0"]
        env.update({} if gpu else {"JAX_NUM_CPU_DEVICES": "1"})
        return [subprocess.Popen(cpu + base + ["--json", str(out / "reference.json")], env=env)]
    if gpu:
        return [subprocess.Popen(base + ["--json", str(out / "pipeline.json")], env=env)]
    port = _free_port()
    env["JAX_NUM_CPU_DEVICES"] = "1"
    return [subprocess.Popen(["taskset", "-c", str(i)] + base + [
        "--json", str(out / f"pipeline{i}.json"), "--process-id", str(i), "--num-processes", str(a.pipe),
        "--coordinator", f"127.0.0.1:{port}"], env=env) for i in range(a.pipe)]


def _wait(procs, what):
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench_pipeline: the {what} run failed (exit codes {codes})")


def summarize(pipe: dict, ref: dict, schedulers: list[str]) -> dict:
    rows = pipe["rows"]
    by = {s: [r for r in rows if r["scheduler"] == s] for s in schedulers}
    med = {s: statistics.median(r["seconds"] for r in by[s]) for s in schedulers}
    pred = {s: statistics.median(r["predicted"] for r in by[s]) for s in schedulers}
    ref_med = {k: statistics.median(v) for k, v in ref.items()}
    per_batch = {s: {r["batch"]: r["seconds"] for r in by[s]} for s in schedulers}
    paired = {}
    for s in schedulers:
        if s == "dip":
            continue
        ratios = [per_batch[s][b] / per_batch["dip"][b] for b in per_batch["dip"]]
        paired[s] = {"median_ratio": statistics.median(ratios), "dip_won": sum(x > 1 for x in ratios),
                     "batches": len(ratios)}
    measured_order = sorted(schedulers, key=lambda s: med[s])
    predicted_order = sorted(schedulers, key=lambda s: pred[s])
    # the orders agree if every pair the prediction orders one way is measured the same way;
    # a pair within TIE of each other, measured or predicted, is a tie and may swap
    disagreements = [(x, y) for i, x in enumerate(predicted_order) for y in predicted_order[i + 1:]
                     if med[x] > med[y] * (1 + TIE) and pred[y] > pred[x] * (1 + TIE)]
    errors = [abs(r["seconds"] / r["predicted"] - 1) for r in rows]
    return {"median_seconds": med, "predicted_seconds": pred, "reference_seconds": ref_med,
            "speedup_vs_plain": {s: ref_med["plain"] / med[s] for s in schedulers},
            "speedup_vs_plain_remat": {s: ref_med["plain_remat"] / med[s] for s in schedulers},
            "dip_paired": paired, "measured_order": measured_order, "predicted_order": predicted_order,
            "order_disagreements": disagreements, "orders_agree": not disagreements,
            "prediction_error_median_abs": statistics.median(errors)}


def main(argv=None) -> int:
    a, overrides = _args(argv)
    if a.role != "main":
        if a.role == "pipeline" and a.coordinator:
            from dip_jax.runtime.distributed import initialize
            initialize(a.coordinator, a.num_processes, a.process_id)
        res = (pipeline_worker if a.role == "pipeline" else reference_worker)(a, overrides)
        if a.process_id == 0:
            pathlib.Path(a.json).write_text(json.dumps(res))
        return 0
    import jax
    gpu = jax.default_backend() != "cpu"
    out = pathlib.Path(a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    schedulers = a.schedulers.split(",")
    print(f"bench_pipeline: {a.config} {' '.join(overrides)}; {a.batches} batches; pipe {a.pipe} "
          f"({'one process' if gpu else f'{a.pipe} pinned processes'}); schedulers {', '.join(schedulers)}", flush=True)
    _wait(_launch(a, overrides, "pipeline", out, gpu), "pipelined")
    _wait(_launch(a, overrides, "reference", out, gpu), "reference")
    pipe = json.loads((out / ("pipeline.json" if gpu else "pipeline0.json")).read_text())
    ref = json.loads((out / "reference.json").read_text())
    res = {"config": a.config, "overrides": overrides, "batches": a.batches, "pipe": a.pipe,
           "machine": {k: pipe[k] for k in ("backend", "device_kind", "jax", "processes", "devices")},
           "hardware_profile": pipe["hardware"], **summarize(pipe, ref, schedulers), "rows": pipe["rows"],
           "reference_rows": ref}
    print(f"\n{'scheduler':<17} {'median ms':>10} {'predicted':>10} {'vs plain':>9} {'vs remat':>9} "
          f"{'dip paired':>11} {'dip won':>8}")
    for s in schedulers:
        p = res["dip_paired"].get(s)
        ratio = "{:.3f}x".format(p["median_ratio"]) if p else "-"
        won = "{}/{}".format(p["dip_won"], p["batches"]) if p else "-"
        print(f"{s:<17} {res['median_seconds'][s] * 1e3:10.1f} {res['predicted_seconds'][s] * 1e3:10.1f} "
              f"{res['speedup_vs_plain'][s]:8.2f}x {res['speedup_vs_plain_remat'][s]:8.2f}x {ratio:>11} {won:>8}")
    r = res["reference_seconds"]
    print(f"reference (one device): plain {r['plain'] * 1e3:.1f} ms, plain with remat {r['plain_remat'] * 1e3:.1f} ms")
    print(f"measured order  {' < '.join(res['measured_order'])}")
    print(f"predicted order {' < '.join(res['predicted_order'])}  "
          f"({'agree' if res['orders_agree'] else 'disagree: ' + str(res['order_disagreements'])})")
    print(f"prediction error median |measured/predicted - 1| {res['prediction_error_median_abs']:.3f}")
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
