"""The trainer end to end, by memory strategy: one pinned core without a pipeline against two pinned
processes running DIP with every backward recomputing (`recompute`) and with the planner's
choice (`auto`), on the same batches.

Each run is the README's command (two processes on a CPU host: `JAX_NUM_CPU_DEVICES=1`, `taskset
-c 0` / `-c 1`, gloo over loopback, mesh data=1 x pipe=2, `pipeline.hardware=auto`) with
`--config.train.steps=STEPS --config.train.log_every=1 --config.checkpoint.enabled=false`; the
reference is one process on `taskset -c 0` with `--config.mesh.pipe=1
--config.pipeline.schedule=none`. The runs of one repeat follow each other and the order rotates
from repeat to repeat; the first pipelined run calibrates and the others reuse its profile.
Reported: the median `step_seconds` of steps 4..STEPS (after compilation), the speedups over the
reference, the share of op pairs stored, the compiled program's memory per device and the loss.

    python scripts/bench_memory_strategy.py --config configs/tiny_cpu.py [--config.KEY=VALUE ...] \\
        [--steps 10] [--repeats 1] [--cap-gb X] [--json runs/bench_memory_strategy.json]

`--cap-gb X` adds a pipelined `auto` run under `pipeline.memory_cap_gb=X` (its compiled peak per
device against the cap, and its losses against the uncapped `auto` run's).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ("--config.train.log_every=1", "--config.checkpoint.enabled=false")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.py")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cap-gb", type=float, default=None)
    ap.add_argument("--runs", default="none,recompute,auto", help="which of: none, recompute, auto (and the cap run)")
    ap.add_argument("--json", default="runs/bench_memory_strategy.json")
    ap.add_argument("--workdir", default="runs/bench_memory_strategy")
    ap.add_argument("--port", type=int, default=12391)
    a, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        ap.error(f"unknown argument {bad[0]!r}")
    return a, rest


def _train(a, overrides, workdir: pathlib.Path, extra: list[str], processes: int) -> list[dict]:
    """Run the trainer, return its train records."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    calibration = pathlib.Path(a.workdir) / "calibration"
    if processes > 1 and calibration.exists():
        shutil.copytree(calibration, workdir / "calibration")
    base = [sys.executable, "-m", "dip_jax.train", "--config", a.config, *overrides, *RUN,
            f"--config.train.steps={a.steps}", "--workdir", str(workdir), *extra]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    procs = []
    for i in range(processes):
        cmd = ["taskset", "-c", str(i), *base]
        if processes > 1:
            cmd += ["--coordinator", f"127.0.0.1:{a.port}", "--num-processes", str(processes), "--process-id", str(i)]
        log = open(workdir / f"process{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait()
        log.close()
    if any(p.returncode for p, _ in procs):
        raise SystemExit(f"run in {workdir} failed: see {workdir}/process*.log")
    if processes > 1 and not calibration.exists() and (workdir / "calibration").exists():
        shutil.copytree(workdir / "calibration", calibration)
    a.port += 1
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in lines if r.get("kind") == "train"]


def _summary(records: list[dict]) -> dict:
    timed = [r for r in records if r["step"] >= 4]
    pick = lambda k: [r[k] for r in timed if r.get(k) is not None]
    return {"median_step_seconds": statistics.median(pick("step_seconds")),
            "stored_fraction": statistics.fmean(pick("stored_fraction")) if pick("stored_fraction") else None,
            "compiled_peak_gb": max(pick("compiled_peak_gb"), default=None),
            "predicted_peak_gb": max(pick("predicted_peak_gb"), default=None),
            "predicted_step_seconds": statistics.median(pick("predicted_step_seconds")) if pick("predicted_step_seconds") else None,
            "losses": [r["loss"] for r in records]}


def main(argv=None) -> int:
    a, overrides = _args(argv)
    work = pathlib.Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pipe = ["--config.mesh.data=1", "--config.mesh.pipe=2", "--config.pipeline.schedule=dip",
            "--config.pipeline.hardware=auto"]
    runs = {"1 core, none": (["--config.mesh.data=1", "--config.mesh.pipe=1", "--config.pipeline.schedule=none"], 1),
            "2 processes, dip, recompute": ([*pipe, "--config.pipeline.memory_strategy=recompute"], 2),
            "2 processes, dip, auto": ([*pipe, "--config.pipeline.memory_strategy=auto"], 2)}
    if a.cap_gb is not None:
        runs[f"2 processes, dip, auto, cap {a.cap_gb:g} GB"] = (
            [*pipe, "--config.pipeline.memory_strategy=auto", f"--config.pipeline.memory_cap_gb={a.cap_gb}"], 2)
    keep = {"none": "1 core, none", "recompute": "2 processes, dip, recompute", "auto": "2 processes, dip, auto"}
    for k, n in keep.items():
        if k not in a.runs.split(","):
            del runs[n]
    names = list(runs)
    pipelined = [n for n in names if runs[n][1] > 1]
    results: dict = {n: [] for n in names}
    for rep in range(a.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        if rep == 0 and pipelined:             # the first pipelined run calibrates: put it first
            order = [pipelined[0]] + [n for n in order if n != pipelined[0]]
        for n in order:
            extra, procs = runs[n]
            t0 = time.perf_counter()
            res = _summary(_train(a, overrides, work / f"run{len(sum(results.values(), []))}", extra, procs))
            res["wall_seconds"] = time.perf_counter() - t0
            results[n].append(res)
            print(f"  {n:<40} median step {res['median_step_seconds']:.3f} s  stored {res['stored_fraction']}"
                  f"  predicted peak {res['predicted_peak_gb']} GB  compiled peak {res['compiled_peak_gb']} GB", flush=True)
    ref = statistics.median(r["median_step_seconds"] for r in results[names[0]])
    rows = []
    print(f"\n{'run':<40} {'median step':>11} {'speedup':>8} {'stored':>7} {'peak GB':>8} {'predicted':>9}")
    for n in names:
        med = statistics.median(r["median_step_seconds"] for r in results[n])
        last = results[n][-1]
        rows.append({"run": n, "median_step_seconds": med, "speedup": ref / med, "repeats": results[n]})
        stored = "" if last["stored_fraction"] is None else f"{100 * last['stored_fraction']:.0f}%"
        peak = "" if last["compiled_peak_gb"] is None else f"{last['compiled_peak_gb']:.4f}"
        pred = "" if last["predicted_step_seconds"] is None else f"{last['predicted_step_seconds']:.3f}"
        print(f"{n:<40} {med:10.3f}s {ref / med:7.2f}x {stored:>7} {peak:>8} {pred:>9}")
    out = {"config": a.config, "overrides": overrides, "steps": a.steps, "rows": rows}
    if a.cap_gb is not None:
        capped, free = results[names[-1]][-1], results["2 processes, dip, auto"][-1]
        out["cap"] = {"cap_gb": a.cap_gb, "compiled_peak_gb": capped["compiled_peak_gb"],
                      "within": capped["compiled_peak_gb"] is not None and capped["compiled_peak_gb"] <= a.cap_gb,
                      "largest_loss_difference": max(abs(x - y) for x, y in zip(capped["losses"], free["losses"]))}
        print(f"\ncap {a.cap_gb:g} GB: compiled peak per device {capped['compiled_peak_gb']} GB "
              f"({'within' if out['cap']['within'] else 'OVER'}); stored {capped['stored_fraction']}; "
              f"largest loss difference against the uncapped auto run {out['cap']['largest_loss_difference']:.3g}")
    pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
