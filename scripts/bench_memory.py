"""Per-device memory of the train state and of the compiled step, before and after the
stage-resident layout, with tensor parallelism and ZeRO-1, beside the planner's prediction.

For each config: the parameter and optimizer bytes one device holds (from the state's
shardings), the compiled step's `memory_analysis()` (arguments, temporaries, outputs), and
the planner's per-rank prediction. The tensor and ZeRO-1 rows give the parameter bytes per
device against total / (pipe x tensor) and the optimizer bytes against total / (pipe x tensor x
data) plus the replicated non-block parameters (x 2 for the moments) ("x ideal"); and (`CostModel.param_bytes` summed over a rank's chunks, and the
simulated peak of a 1F1B plan). "before" is the model layout replicated on every device with a
separate update program after the pipelined gradients (what training did before the state moved
into the stage layout); "after" is the stage layout with one program per step. Everything is
compiled from abstract arrays: nothing of the state is allocated, so large configs fit.

    python scripts/bench_memory.py [--json runs/bench_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax                                                   # noqa: E402
import numpy as np                                           # noqa: E402
import optax                                                 # noqa: E402
from flax import nnx                                         # noqa: E402

from dip_jax.data.pipeline import PackedBatches              # noqa: E402
from dip_jax.config.overrides import apply_overrides, load_config_file  # noqa: E402
from dip_jax.plan.schedulers import PlanContext              # noqa: E402
from dip_jax.runtime.mesh import make_mesh                   # noqa: E402
from dip_jax.train.optim import build_optimizer              # noqa: E402
from dip_jax.train.pipelined import PipelinedStep            # noqa: E402
from dip_jax.train.planning import plan_batch, reorder       # noqa: E402
from dip_jax.train.state import abstract_model, bytes_per_device, model_layouts, state_bytes, state_shapes  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
LARGER = [f"model.{m}.{k}={v}" for m in ("vision", "audio", "llm")
          for k, v in (("dim", 512), ("mlp_hidden", 2048), ("heads", 8), ("kv_heads", 8), ("layers", 16))]
# (overrides, meshes (data, pipe, tensor, ZeRO-1)): tiny_cpu's modules have 4 layers (so at most
# pipe=4) and 2 kv heads (so at most tensor=2)
CONFIGS = {"tiny_cpu": ([], ((2, 4, 1, False), (2, 4, 1, True), (1, 4, 1, False), (1, 4, 2, False), (2, 2, 2, True))),
           "tiny_cpu dims 512, 16 layers": (LARGER, ((2, 4, 1, False), (2, 4, 1, True), (1, 8, 1, False),
                                                      (1, 2, 4, False), (2, 2, 2, True), (1, 4, 2, False)))}
MIB = 2 ** 20


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes}


def measure(name: str, overrides: list[str], data: int, pipe: int, tensor: int, zero: bool) -> dict:
    cfg = apply_overrides(load_config_file(ROOT / "configs/tiny_cpu.py"),
                          [f"mesh.data={data}", f"mesh.pipe={pipe}", f"mesh.tensor={tensor}", "pipeline.schedule=1f1b",
                           f"optim.shard_state_over_data={zero}", *overrides])
    mesh = make_mesh(data, pipe, tensor)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    ctx = PlanContext(cfg)
    step = PipelinedStep(cfg, abstract_model(cfg)[1], mesh, tx, ctx)
    ex = step.executor
    batch = PackedBatches(cfg)(0)
    order, replicas = plan_batch(ctx, 0, batch.metadata, "1f1b")
    plans = [r.plan for r in replicas]
    inputs, sig = ex.prepare(reorder(batch.arrays, order), plans)

    after = state_shapes(cfg, tx, mesh, step.layouts)
    before = state_shapes(cfg, tx, mesh, model_layouts(cfg))
    total = state_bytes(after, step.layouts)[0]
    rows = {}
    # "before" only beside the pipe-only meshes without ZeRO-1 it is the baseline of
    for label, state in ((("before", before),) if tensor == 1 and not zero else ()) + (("after", after),):
        row = {"params": bytes_per_device(state["params"]), "optimizer": bytes_per_device(state["opt_state"])}
        if label == "after":
            row["step"] = analysis(ex._build(("train", sig)).lower(after, ex.masks, *inputs).compile())
        else:
            grads = ex._build(("grads", sig)).lower(after["params"], ex.masks, *inputs).compile()

            def apply(state, grads):
                updates, opt = tx.update(grads, state["opt_state"], state["params"])
                return {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt}
            update = jax.jit(apply, donate_argnums=0).lower(before, before["params"]).compile()
            row["step"] = analysis(grads)
            row["update"] = analysis(update)
        rows[label] = row
    lock = ctx.plan(batch.metadata[: cfg.data.microbatches // data], "1f1b", rollouts=1).lockstep
    costs = ctx.partition.costs(ctx.cost, cfg.model)
    predicted_static = max(costs.static(r) for r in range(pipe))
    compiled_after = rows["after"]["step"]
    compiled_peak = compiled_after["arguments"] + compiled_after["temporaries"] + \
        compiled_after["outputs"] - compiled_after["aliased"]
    params_total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract_model(cfg)[1])))
    replicated = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(after["params"])
                     if x.sharding.is_fully_replicated)
    # the bound the split parameters are held to: total / (pipe x tensor) + the replicated ones
    ideal = {"params": (params_total - replicated) / (pipe * tensor) + replicated,
             "optimizer": 2 * ((params_total - replicated) / (pipe * tensor) + replicated) / (data if zero else 1)}
    return {"config": name, "mesh": {"data": data, "pipe": pipe, "tensor": tensor}, "zero1": zero,
            "state_bytes_total": total, **rows, "ideal": ideal, "replicated_param_bytes": replicated,
            "params_over_ideal": rows["after"]["params"] / ideal["params"],
            "optimizer_over_ideal": rows["after"]["optimizer"] / ideal["optimizer"],
            "predicted_param_state_bytes": predicted_static, "predicted_peak_bytes": max(lock.peak_memory),
            "compiled_peak_bytes": compiled_peak, "predicted_over_compiled": max(lock.peak_memory) / compiled_peak}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="runs/bench_memory.json")
    a = ap.parse_args()
    results = []
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices, jax {jax.__version__}; MiB per device")
    print(f"{'config':30s} {'mesh dxpxt':>10s} {'zero1':>5s} {'layout':>7s} {'params':>8s} {'x ideal':>7s} "
          f"{'optim':>8s} {'x ideal':>7s} {'args':>8s} {'temps':>8s} "
          f"{'outputs':>8s} {'pred. static':>12s} {'pred. peak':>10s} {'pred/compiled':>13s}")
    for name, (overrides, meshes) in CONFIGS.items():
        for data, pipe, tensor, zero in meshes:
            r = measure(name, overrides, data, pipe, tensor, zero)
            results.append(r)
            for label in ("before", "after"):
                if label not in r:
                    continue
                row, st = r[label], r[label]["step"]
                ratios = (f"{r['params_over_ideal']:7.2f}", f"{r['optimizer_over_ideal']:7.2f}") if label == "after" \
                    else ("", "")
                extra = (f"{r['predicted_param_state_bytes'] / MIB:12.1f} {r['predicted_peak_bytes'] / MIB:10.1f} "
                         f"{r['predicted_over_compiled']:13.2f}") if label == "after" else ""
                upd = f" (+ update program: args {row['update']['arguments'] / MIB:.1f})" if "update" in row else ""
                print(f"{name:30s} {f'{data}x{pipe}x{tensor}':>10s} {'on' if zero else 'off':>5s} {label:>7s} "
                      f"{row['params'] / MIB:8.1f} {ratios[0]:>7s} {row['optimizer'] / MIB:8.1f} {ratios[1]:>7s} "
                      f"{st['arguments'] / MIB:8.1f} {st['temporaries'] / MIB:8.1f} {st['outputs'] / MIB:8.1f} {extra}{upd}")
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
