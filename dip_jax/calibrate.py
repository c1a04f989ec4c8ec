"""Calibrate the cost model on the running backend.

    python -m dip_jax.calibrate --config configs/X.py [--config.KEY=VALUE ...] [--out profile.json]

writes a calibration profile (`plan/calibrated.py`) that `--config.pipeline.hardware=PATH` reads;
`--config.pipeline.hardware=auto` calibrates when training starts and keeps the profile in the
workdir, keyed by backend, device kind, jax version, mesh and model config. The measuring
itself lives beside the trainer (`train/calibration.py`, `train/measure.py`), which calibrates
for `auto`; this command sits above it and is imported by nothing.

What is measured: `train/measure.py`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import numpy as np

from dip_jax.train.calibration import base_profile, calibrate


def main(argv: list[str] | None = None) -> int:
    from dip_jax.config import ConfigError
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    out = None
    rest = []
    for a in argv:
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            rest.append(a)
    if "--out" in rest:
        i = rest.index("--out")
        if i + 1 >= len(rest):
            print("error: --out needs a path", file=sys.stderr)
            return 2
        out = rest[i + 1]
        del rest[i:i + 2]
    try:
        path, workdir, overrides, extra = parse_config_args(rest)
        if extra:
            raise ConfigError(f"unknown argument {extra[0]!r}")
        if path is None:
            raise ConfigError("--config is required")
        cfg = apply_overrides(load_config_file(path), overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dip_jax.runtime.mesh import configure_host_devices, mesh_for
    configure_host_devices()
    from dip_jax.train.pretrained import resolve
    try:
        cfg = resolve(cfg)           # init_from modules: their checkpoint's architecture
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dip_jax.plan.schedulers import PlanContext
    from dip_jax.train.optim import build_optimizer
    from dip_jax.train.pipelined import PipelinedStep
    from dip_jax.train.state import abstract_model
    if cfg.pipeline.hardware == "auto":
        cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, hardware=base_profile(cfg)))
    mesh = mesh_for(cfg)
    _, model = abstract_model(cfg)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules, mesh, staged=True)
    t0 = time.perf_counter()
    ctx = PlanContext(cfg)
    executor = PipelinedStep(cfg, model, mesh, tx, ctx).executor
    cal = calibrate(cfg, mesh, executor, ctx)
    out = pathlib.Path(out or f"runs/{cfg.model.name}/calibration.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out)
    accs = [a["accuracy"] for m in cal.accuracy.values() for k in m.values() for a in k]
    print(f"dip_jax: calibrated in {time.perf_counter() - t0:.1f} s; held-out op accuracy "
          f"{np.mean(accs):.1%} (min {min(accs):.1%}); profile {out} "
          f"(use --config.pipeline.hardware={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
