"""Executor benchmark: the table-driven step against plain jitted steps of the same model.

Measures, on whatever backend jax finds (CPU fake devices or one GPU), with P=1 so that no
pipeline parallelism is involved:
- executor step vs the plain jitted value_and_grad with the same rematerialisation
  (jax.checkpoint of the loss: every chunk's forward recomputed once) and without remat;
- the cost of an idle tick (a table of idle ticks, n_ticks = T vs 0);
- compile seconds of the executor program, and bytes per stash slot of each module.

    python scripts/bench_executor.py --json runs/bench_executor.json            # CPU, tiny
    python scripts/bench_executor.py --dim 1024 --layers 8 --seq 2048 ...       # GPU-sized
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

import jax                                                   # noqa: E402
import jax.numpy as jnp                                      # noqa: E402
import numpy as np                                           # noqa: E402
from flax import nnx                                         # noqa: E402

from dip_jax.config import DataConfig, LLMConfig, MeshConfig, ModelConfig, TrainConfig, VisionConfig  # noqa: E402
from dip_jax.data.pipeline import PackedBatches              # noqa: E402
from dip_jax.models.lmm import LMM                           # noqa: E402
from dip_jax.plan.baselines import schedule_baseline         # noqa: E402
from dip_jax.plan.partition import ModalityPartition  # noqa: E402
from dip_jax.plan.schedule import ModuleChunks               # noqa: E402
from dip_jax.plan.simulate import Costs                      # noqa: E402
from dip_jax.plan.workload import workload_from_metadata     # noqa: E402
from dip_jax.train.measure import median_seconds                 # noqa: E402
from dip_jax.runtime.mesh import make_mesh                   # noqa: E402
from dip_jax.runtime.pipeline import PipelineExecutor        # noqa: E402


def timed(fn, reps):
    return median_seconds(fn, reps, warmup=1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--idle-ticks", type=int, default=256)
    ap.add_argument("--json", default="runs/bench_executor.json")
    ap.add_argument("--hlo", default=None, help="also write the compiled executor HLO here")
    a = ap.parse_args()
    heads = max(2, a.dim // 64)
    blk = dict(dim=a.dim, mlp_hidden=4 * a.dim, heads=heads, kv_heads=heads)
    cfg = TrainConfig(model=ModelConfig(vision=VisionConfig(layers=a.layers, image_size=32, patch_size=4, channels=3,
                                                            spatial_merge=2, **blk),
                                        audio=None, llm=LLMConfig(layers=a.layers, vocab_size=1024, **blk)),
                      mesh=MeshConfig(data=1, pipe=1),
                      data=DataConfig(seq_len=a.seq, microbatches=a.microbatches, max_images=a.images,
                                      max_audio_clips=0, max_video_clips=0))
    model = LMM(cfg.model, nnx.Rngs(0))
    params = nnx.state(model)
    graphdef = nnx.graphdef(model)
    batch = PackedBatches(cfg)(0)
    arrays = {k: jnp.asarray(v) for k, v in batch.arrays.items()}
    loss = lambda p, b: nnx.merge(graphdef, p)(b)[0]
    plain = jax.jit(jax.value_and_grad(loss))
    remat = jax.jit(jax.value_and_grad(jax.checkpoint(loss)))
    part = ModalityPartition(1, tuple(ModuleChunks(m, 1, (getattr(cfg.model, m).layers,), True,
                                                   a.images if m == "vision" else 1) for m in cfg.model.modules))
    ex = PipelineExecutor(model, part, make_mesh(1, 1), {"vision": a.images}, a.seq)
    plan = schedule_baseline("1f1b", part.graph(workload_from_metadata(cfg, batch.metadata)), Costs(latency=lambda o: 1.0))
    ops, recv, n_ticks, sig = ex.tables([plan])
    args = [ex.to_stage(params), ex.masks, *ex.device_inputs(batch.arrays, ops, recv, n_ticks)]
    t0 = time.perf_counter()
    step = ex.cache.get(("grads", sig), *args)
    compile_s = time.perf_counter() - t0
    t_exec = timed(lambda: step(*args), a.reps)
    t_plain = timed(lambda: plain(params, arrays), a.reps)
    t_remat = timed(lambda: remat(params, arrays), a.reps)
    # idle ticks: same program (a bigger table bucket would be another program: use this one)
    idle = [*args]
    idle[3] = ex.device_inputs(batch.arrays, np.zeros_like(ops), recv, 0)[1]
    T_max = ops.shape[1]
    ticks = lambda n: ex.device_inputs(batch.arrays, ops, recv, n)[3]
    t_idle = timed(lambda: step(*idle[:5], ticks(T_max)), a.reps)
    t_zero = timed(lambda: step(*idle[:5], ticks(0)), a.reps)
    slot_bytes = {m: int(sum(np.prod(l.shape) * l.dtype.itemsize for l in jax.tree.leaves(ex.spec.carry[m])))
                  for m in ex.modules}
    res = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "dim": a.dim, "layers": a.layers, "seq": a.seq, "microbatches": a.microbatches, "ticks": n_ticks,
           "executor_step_s": t_exec, "plain_remat_step_s": t_remat, "plain_step_s": t_plain,
           "executor_vs_plain_ratio": t_exec / t_remat, "executor_vs_plain_no_remat_ratio": t_exec / t_plain,
           "idle_tick_s": (t_idle - t_zero) / T_max, "compile_s": compile_s, "stash_slot_bytes": slot_bytes}
    print(f"backend {res['backend']} ({res['device']}), jax {jax.__version__}; dim {a.dim}, layers {a.layers}, "
          f"seq {a.seq}, {a.microbatches} microbatches, {n_ticks} ticks")
    print(f"  executor step        {1e3 * t_exec:9.2f} ms")
    print(f"  plain step + remat   {1e3 * t_remat:9.2f} ms   executor/plain = {res['executor_vs_plain_ratio']:.3f}")
    print(f"  plain step, no remat {1e3 * t_plain:9.2f} ms   executor/plain = {res['executor_vs_plain_no_remat_ratio']:.3f}")
    print(f"  idle tick            {1e6 * res['idle_tick_s']:9.1f} us")
    print(f"  compile              {compile_s:9.2f} s")
    print(f"  bytes per stash slot {slot_bytes}")
    if a.hlo:
        text = step.as_text()
        pathlib.Path(a.hlo).write_text(text)
        import re
        loop_copies = re.findall(r"= f32\[([\d,]+)\][^\n]* copy\(", text)
        res["hlo_f32_copies"] = len(loop_copies)
        res["hlo_conditional_ops"] = text.count(" conditional(")
        res["hlo_while_ops"] = text.count(" while(")
        print(f"  HLO: {res['hlo_while_ops']} while, {res['hlo_conditional_ops']} conditional, "
              f"{len(loop_copies)} f32 copies")
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
