"""`python -m dip_jax.plan --config configs/X.py [--metadata FILE.jsonl] [--batches N]
[--schedulers dip,1f1b,...] [--seed S] [--budget SECONDS] [--rollouts N] [--out DIR]`

Plans N batches with each scheduler (and the memory strategy per op of
`--config.pipeline.memory_strategy`; "stored": the share of op pairs that keep their residuals),
simulates them (lock-step as dip_jax executes, async as in
the paper's runtime), prints a comparison table and writes DIR/plan_report.json plus, for the
first batch, a timeline PNG and a Chrome/Perfetto trace per scheduler. Pure Python: no jax.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from dip_jax.config import SCHEDULERS, ConfigError


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m dip_jax.plan", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True)
    p.add_argument("--metadata", help="JSONL, one sample per line: text_tokens, images, audio_seconds, video_seconds "
                                      "and the metadata fields of registered module specs")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=1.0, help="DIP search seconds per batch")
    p.add_argument("--rollouts", type=int, default=None, help="fixed rollout count (deterministic) instead of --budget")
    p.add_argument("--workers", type=int, default=1, help="search processes per batch (parallel rollouts)")
    p.add_argument("--out", default=None)
    p.add_argument("--hardware", default=None, help="profile name or JSON path (default: the config's)")
    args, rest = p.parse_known_args(argv)
    return args, rest


def check_args(args) -> None:
    """Counts and budgets that would plan nothing are errors, not empty reports."""
    for name, v in (("--batches", args.batches), ("--workers", args.workers), ("--rollouts", args.rollouts)):
        if v is not None and v < 1:
            raise ConfigError(f"{name}: must be >= 1, got {v}")
    if not args.budget > 0:
        raise ConfigError(f"--budget: must be > 0 seconds, got {args.budget:g}")


def batches_for(cfg, args, index_dir=None):
    """(batches, over-long sample counts). A metadata file is packed exactly as the trainer
    packs, over-long samples handled by `data.oversize`; the files task's batches come from its
    metadata index (kept in `index_dir`), nothing decoded."""
    from dip_jax.data.metadata import read_metadata_jsonl
    from dip_jax.data.oversize import OversizeCounts, fit_metas
    from dip_jax.data.packing import Budget, pack_into_batches
    budget = Budget.from_config(cfg)
    if args.metadata:
        metas, counts = fit_metas(list(read_metadata_jsonl(args.metadata)), budget, cfg.data.oversize)
        packed = pack_into_batches(metas, budget, cfg.data.microbatches)
        full = [b for b in packed if len(b) == cfg.data.microbatches]
        if not full:
            raise ConfigError(f"--metadata: {args.metadata} fills no whole batch of {cfg.data.microbatches} microbatches")
        return full[: args.batches], counts
    if cfg.model.extra_modules:
        raise ConfigError(f"--metadata: needed for module {cfg.model.extra_modules[0][0]!r} "
                          f"(the synthetic data brings no items for it)")
    from dip_jax.data.stream import PackedStream
    source = PackedStream(cfg, content=False, cache_dir=index_dir)
    counts = OversizeCounts()
    batches = []
    for i in range(args.batches):
        metadata, (truncated, skipped) = source.metadata_and_oversize(i)
        counts += OversizeCounts(truncated, skipped)
        batches.append(metadata)
    return batches, counts


def main(argv=None) -> int:
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    args, rest = _args(sys.argv[1:] if argv is None else argv)
    try:
        _, _, overrides, unknown = parse_config_args(rest)
        if unknown:
            raise ConfigError(f"unknown argument {unknown[0]!r}")
        check_args(args)
        cfg = apply_overrides(load_config_file(args.config), overrides)
        # the planner reads no checkpoints: it would plan the config's own (default) architecture
        for m in cfg.model.modules:
            if getattr(cfg.model.module(m), "init_from", ""):
                raise ConfigError(f"model.{m}.init_from: the plan command does not read checkpoints; "
                                  f"give the module's architecture keys instead")
        from dip_jax.plan.schedulers import SCHEDULERS, PlanContext
        names = [s.strip() for s in args.schedulers.split(",") if s.strip()]
        bad = [s for s in names if s not in SCHEDULERS]
        if bad:
            raise ConfigError(f"--schedulers: unknown {bad}; choose from {', '.join(SCHEDULERS)}")
        out = pathlib.Path(args.out or f"runs/plan_{cfg.model.name}")
        batches, oversize = batches_for(cfg, args, out / "data_index")
        # a model with modules the synthetic task cannot describe scores partitions on the file's batches
        ctx = PlanContext(cfg, args.hardware, probe_batches=batches if cfg.model.extra_modules else None)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.model.name}: P={cfg.mesh.pipe} TP={cfg.mesh.tensor} on {ctx.hw.name}, "
          f"{len(batches)} batches x {cfg.data.microbatches} microbatches; DIP chunks "
          + ", ".join(f"{m.name} {m.chunks}x~{m.layers[0]} layers (B={m.unit})" for m in ctx.partition.modules),
          flush=True)
    from dip_jax.data.packing import Budget
    warning = oversize.warning(cfg.data.oversize, Budget.from_config(cfg))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    report = {"config": cfg.model.name, "hardware": ctx.hw.name, "pipe": cfg.mesh.pipe, "tensor": cfg.mesh.tensor,
              "oversize": cfg.data.oversize, **oversize.fields(), "schedulers": {}}
    from dip_jax.viz.timeline import write_png, write_trace
    for name in names:
        recs = []
        for i, mbs in enumerate(batches):
            res = ctx.plan(mbs, name, runtime=False, budget_seconds=args.budget, rollouts=args.rollouts,
                           seed=args.seed + i, workers=args.workers)
            recs.append(res.record())
            if i == 0:
                write_png(res.plan, res.lockstep, out / f"timeline_{name}.png", f"{cfg.model.name} {name}")
                write_trace(res.plan, res.lockstep, out / f"timeline_{name}.trace.json", f"{cfg.model.name} {name}")
            print(f"  {name:16s} batch {i}: {res.lockstep.iteration_seconds:8.3f} s lock-step, "
                  f"{res.async_.iteration_seconds:8.3f} s async, bubble {100 * res.lockstep.bubble_fraction:5.1f}%",
                  file=sys.stderr, flush=True)
        report["schedulers"][name] = {"batches": recs}
    (out / "plan_report.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"wrote {out / 'plan_report.json'} and timelines in {out}")
    return 0


def summarize(report: dict) -> dict:
    mean = lambda name, key: statistics.fmean(b[key] for b in report["schedulers"][name]["batches"])
    return {name: {"iteration": mean(name, "iteration_seconds"), "async": mean(name, "async_iteration_seconds"),
                   "bubble": mean(name, "bubble_fraction"), "async_bubble": mean(name, "async_bubble_fraction"),
                   "peak": max(max(b["peak_memory_bytes"]) for b in report["schedulers"][name]["batches"]),
                   "oom": any(b["oom"] for b in report["schedulers"][name]["batches"]),
                   "plan": mean(name, "plan_seconds"),
                   "stored": statistics.fmean(b.get("stored_fraction", 0.0) for b in report["schedulers"][name]["batches"])}
            for name in report["schedulers"]}


def format_table(report: dict) -> str:
    s = summarize(report)
    names = list(s)
    head = (f"{'scheduler':16s} {'lock-step s':>11s} {'async s':>9s} {'bubble':>7s} {'async bub':>9s} "
            f"{'peak GB':>8s} {'OOM':>4s} {'stored':>6s} {'plan s':>7s}  gain (lock-step) vs " + " ".join(f"{n:>10s}" for n in names))
    lines = [head, "-" * len(head)]
    for n in names:
        r = s[n]
        gains = " ".join(f"{100 * (s[o]['iteration'] / r['iteration'] - 1):+9.1f}%" for o in names)
        lines.append(f"{n:16s} {r['iteration']:11.3f} {r['async']:9.3f} {100 * r['bubble']:6.1f}% "
                     f"{100 * r['async_bubble']:8.1f}% {r['peak'] / 1e9:8.1f} {'yes' if r['oom'] else 'no':>4s} "
                     f"{100 * r['stored']:5.0f}% "
                     f"{r['plan']:7.2f}  {'':19s}{gains}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
