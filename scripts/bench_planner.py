"""Planner benchmark: plan time per batch and schedule quality vs search budget.

Runs in one process (one core). For each model: DIP's lock-step iteration time and bubble at
each search budget, the baselines on the same batches, and the time to plan one batch with a
fixed rollout budget (deterministic). Prints tables and writes JSON.

    python scripts/bench_planner.py --models vlm_l --batches 4 --json runs/bench_planner.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dip_jax.data.pipeline import PackedBatches          # noqa: E402
from dip_jax.config.overrides import load_config_file            # noqa: E402
from dip_jax.plan.schedulers import PlanContext           # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vlm_s,vlm_m,vlm_l,t2v_s,t2v_l")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--budgets", default="0.25,1,2,5,10")
    ap.add_argument("--rollouts", type=int, default=8, help="fixed rollout budget for the plan-time row")
    ap.add_argument("--baselines", default="1f1b,interleaved_1f1b,gpipe,encoders_first,nnscaler")
    ap.add_argument("--json", default="runs/bench_planner.json")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    out = {"batches": args.batches, "models": {}}
    for name in args.models.split(","):
        cfg = load_config_file(ROOT / f"configs/{name}.py")
        ctx = PlanContext(cfg)
        src = PackedBatches(cfg, content=False)
        batches = [src.metadata(i) for i in range(args.batches)]
        res = {"microbatches": cfg.data.microbatches, "pipe": cfg.mesh.pipe, "budget": {}, "baselines": {}}
        for b in budgets:
            rs = [ctx.plan(m, "dip", runtime=False, budget_seconds=b, seed=i) for i, m in enumerate(batches)]
            res["budget"][b] = {"iteration_seconds": statistics.fmean(r.lockstep.iteration_seconds for r in rs),
                                "bubble_fraction": statistics.fmean(r.lockstep.bubble_fraction for r in rs),
                                "async_bubble_fraction": statistics.fmean(r.async_.bubble_fraction for r in rs),
                                "rollouts": statistics.fmean(r.rollouts for r in rs)}
        times = []
        for i, m in enumerate(batches):
            t0 = time.perf_counter()
            r = ctx.plan(m, "dip", runtime=False, rollouts=args.rollouts, seed=i)
            times.append(time.perf_counter() - t0)
        res["plan_seconds_median"] = statistics.median(times)
        res["plan_rollouts"] = args.rollouts
        res["plan_bubble_fraction"] = r.lockstep.bubble_fraction
        for s in args.baselines.split(","):
            rs = [ctx.plan(m, s, runtime=False) for m in batches]
            res["baselines"][s] = {"iteration_seconds": statistics.fmean(r.lockstep.iteration_seconds for r in rs),
                                   "bubble_fraction": statistics.fmean(r.lockstep.bubble_fraction for r in rs),
                                   "async_iteration_seconds": statistics.fmean(r.async_.iteration_seconds for r in rs)}
        out["models"][name] = res
        print(f"\n{name}: P={cfg.mesh.pipe}, {cfg.data.microbatches} microbatches, {args.batches} batches; "
              f"plan time with {args.rollouts} rollouts: median {res['plan_seconds_median']:.2f} s")
        print(f"  {'DIP budget s':>12s} {'iteration s':>12s} {'bubble':>8s} {'async bubble':>13s} {'rollouts':>9s}")
        for b, v in res["budget"].items():
            print(f"  {b:12.2f} {v['iteration_seconds']:12.3f} {100 * v['bubble_fraction']:7.1f}% "
                  f"{100 * v['async_bubble_fraction']:12.1f}% {v['rollouts']:9.1f}")
        for s, v in res["baselines"].items():
            print(f"  {s:>12s} {v['iteration_seconds']:12.3f} {100 * v['bubble_fraction']:7.1f}%")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
