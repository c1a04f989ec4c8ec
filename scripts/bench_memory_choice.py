"""The memory strategy per op in simulation: DIP with the planner's choice (`auto`) against DIP
recompute-only, on the paper's models at their configured memory caps, and the time the
per-rank choice takes.

One process (one core), pure Python: for each model and batch, DIP's op order is searched once
(a fixed rollout count, deterministic); the same order is then simulated recompute-only, with
the choice (`auto`) and with everything stored (`store`, whatever the cap). Reported per model:
the mean lock-step iteration time, the largest per-rank peak memory against the cap, the share
of op pairs stored, the gain of `auto` over recompute-only, and the median seconds of one
rank's choice (the knapsack, not the re-simulation).

    python scripts/bench_memory_choice.py [--models vlm_s,vlm_m,vlm_l,t2v_s,t2v_l] [--batches 4] \\
        [--rollouts 32] [--json runs/bench_memory_choice.json]
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

from dip_jax.data.stream import PackedStream              # noqa: E402
from dip_jax.config.overrides import load_config_file            # noqa: E402
from dip_jax.plan.memory import choose                    # noqa: E402
from dip_jax.plan.schedulers import PlanContext           # noqa: E402
from dip_jax.plan.simulate import simulate                # noqa: E402

MODES = ("recompute", "auto", "store")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vlm_s,vlm_m,vlm_l,t2v_s,t2v_l")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=32)
    ap.add_argument("--json", default="runs/bench_memory_choice.json")
    a = ap.parse_args()
    out = {}
    for name in a.models.split(","):
        cfg = load_config_file(ROOT / "configs" / f"{name}.py")
        ctx = PlanContext(cfg)
        source = PackedStream(cfg, content=False)
        per = cfg.data.microbatches // cfg.mesh.data
        rows = {m: [] for m in MODES}
        rank_seconds, wall = [], []
        for b in range(a.batches):
            res = ctx.plan(source.metadata(b)[:per], "dip", runtime=False, rollouts=a.rollouts, seed=b,
                           memory_strategy="recompute")
            for mode in MODES:
                t0 = time.perf_counter()
                plan, info = choose(res.plan, res.costs, ctx.memory_cap, mode)
                if mode == "auto":
                    wall.append(time.perf_counter() - t0)
                    rank_seconds += info.seconds
                tl = simulate(plan, res.costs, "lockstep")
                rows[mode].append({"iteration_seconds": tl.iteration_seconds, "peak_bytes": max(tl.peak_memory),
                                   "peak_per_rank": list(tl.peak_memory), "stored_fraction": info.fraction,
                                   "gap": info.gap})
        summary = {m: {"iteration_seconds": statistics.fmean(r["iteration_seconds"] for r in rows[m]),
                       "peak_gb": max(r["peak_bytes"] for r in rows[m]) / 1e9,
                       "stored_fraction": statistics.fmean(r["stored_fraction"] for r in rows[m])} for m in MODES}
        gain = summary["recompute"]["iteration_seconds"] / summary["auto"]["iteration_seconds"] - 1
        out[name] = {"cap_gb": ctx.memory_cap / 1e9, "P": cfg.mesh.pipe, "summary": summary, "batches": rows,
                     "auto_gain": gain, "rank_choice_seconds_median": statistics.median(rank_seconds),
                     "rank_choice_seconds_max": max(rank_seconds), "choice_wall_seconds_median": statistics.median(wall),
                     "largest_gap": max(g for r in rows["auto"] for g in r["gap"])}
        print(f"{name} (P={cfg.mesh.pipe}, cap {ctx.memory_cap / 1e9:.0f} GB, {a.batches} batches)")
        for m in MODES:
            s = summary[m]
            print(f"  {m:<10} {s['iteration_seconds']:9.3f} s  peak {s['peak_gb']:8.1f} GB  "
                  f"stored {100 * s['stored_fraction']:5.1f}%")
        o = out[name]
        print(f"  auto vs recompute: {100 * gain:+.1f}%; one rank's choice: median "
              f"{1e3 * o['rank_choice_seconds_median']:.1f} ms (max {1e3 * o['rank_choice_seconds_max']:.1f}); "
              f"largest proven gap {100 * o['largest_gap']:.1f}%", flush=True)
    pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
