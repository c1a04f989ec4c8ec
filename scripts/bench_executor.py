"""Executor benchmark: the table-driven step against plain jitted steps of the same model.

Measures, on whatever backend jax finds (CPU fake devices or one GPU), with P=1 so that no
pipeline parallelism is involved:
- executor step vs the plain jitted value_and_grad with the same rematerialisation
  (jax.checkpoint of the loss: every chunk's forward recomputed once) and without remat;
- the cost of an idle tick (a table of idle ticks, n_ticks = T vs 0);
- compile seconds of the executor program, and bytes per stash slot of each module.

    python scripts/bench_executor.py --json runs/bench_executor.json            # CPU, tiny
    python scripts/bench_executor.py --dim 1024 --layers 8 --seq 2048 ...       # GPU-sized
    python scripts/bench_executor.py --compile-only --attention blockwise --dim 2048 --layers 8 \
        --seq 4096 --images 16 --microbatches 4                                  # memory, nothing run

`--compile-only` builds the model and parameters from shapes only (nothing allocated), lowers
and compiles the executor step, runs nothing, and reports the compiled program's
memory_analysis(): `executor_temp_bytes` (temporaries) and `executor_argument_bytes`.
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
from dip_jax.models import attention as attention_backends   # noqa: E402
from dip_jax.models.lmm import LMM, abstract_model           # noqa: E402
from dip_jax.plan.baselines import schedule_baseline         # noqa: E402
from dip_jax.plan.partition import ModalityPartition  # noqa: E402
from dip_jax.plan.schedule import ModuleChunks               # noqa: E402
from dip_jax.plan.simulate import Costs                      # noqa: E402
from dip_jax.plan.workload import workload_from_metadata     # noqa: E402
from dip_jax.train.measure import median_seconds                 # noqa: E402
from dip_jax.runtime import hlo                     # noqa: E402
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
    ap.add_argument("--remat", default="auto", choices=("auto", "chunk", "layers"),
                    help="what a recomputing backward keeps (pipeline.remat)")
    ap.add_argument("--hlo", default=None, help="also write the compiled executor HLO here")
    ap.add_argument("--attention", default="xla", help="model.attention: auto, xla, blockwise, cudnn, splash")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model.compute_dtype")
    ap.add_argument("--compile-only", action="store_true",
                    help="abstract parameters, compile the executor step, run nothing; report its memory")
    a = ap.parse_args()
    heads = max(2, a.dim // 64)
    blk = dict(dim=a.dim, mlp_hidden=4 * a.dim, heads=heads, kv_heads=heads)
    cfg = TrainConfig(model=ModelConfig(vision=VisionConfig(layers=a.layers, image_size=32, patch_size=4, channels=3,
                                                            spatial_merge=2, **blk),
                                        audio=None, llm=LLMConfig(layers=a.layers, vocab_size=1024, **blk),
                                        attention=a.attention, compute_dtype=a.dtype),
                      mesh=MeshConfig(data=1, pipe=1),
                      data=DataConfig(seq_len=a.seq, microbatches=a.microbatches, max_images=a.images,
                                      max_audio_clips=0, max_video_clips=0))
    cfg.check()
    attention = attention_backends.choose(a.attention, jnp.dtype(a.dtype), a.seq, a.seq, a.dim // heads)
    if a.compile_only:
        return compile_only(cfg, a, attention)
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
    ex = PipelineExecutor(model, part, make_mesh(1, 1), {"vision": a.images}, a.seq, remat=a.remat)
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
           "attention": attention, "dtype": a.dtype,
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
    return finish(res, step, a, ex)


def finish(res: dict, step, a, ex) -> int:
    res["remat"] = dict(ex.remat_chosen)
    print(f"  remat                {res['remat']}")
    if a.hlo:
        text = step.as_text()
        pathlib.Path(a.hlo).write_text(text)
        syncs = hlo.host_sync_ops(text)
        copies = hlo.loop_buffer_copies(text)
        res["hlo_host_sync_ops"] = len(syncs)
        res["hlo_dynamic_while_ops"] = sum(i.op == "while" for i in syncs)
        res["hlo_conditional_ops"] = sum(i.op == "conditional" for i in syncs)
        res["hlo_loop_buffer_copies"] = len(copies)
        print(f"  HLO: {len(syncs)} host-synchronising ops ({res['hlo_dynamic_while_ops']} while without a known "
              f"trip count, {res['hlo_conditional_ops']} conditional), {len(copies)} copies of a carried buffer "
              f"in the tick loop; written to {a.hlo}")
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


def compile_only(cfg: TrainConfig, a, attention: str) -> int:
    """The executor step of the same tables, lowered from shapes: the model is nnx.eval_shape'd
    and its stage-layout parameters are ShapeDtypeStructs (with their shardings), so a model
    too big for this host's memory still compiles. The batch and tables are real (small)."""
    model = abstract_model(cfg.model)
    batch = PackedBatches(cfg)(0)
    part = ModalityPartition(1, tuple(ModuleChunks(m, 1, (getattr(cfg.model, m).layers,), True,
                                                   a.images if m == "vision" else 1) for m in cfg.model.modules))
    ex = PipelineExecutor(model, part, make_mesh(1, 1), {"vision": a.images}, a.seq, remat=a.remat)
    plan = schedule_baseline("1f1b", part.graph(workload_from_metadata(cfg, batch.metadata)), Costs(latency=lambda o: 1.0))
    ops, recv, n_ticks, sig = ex.tables([plan])
    staged = jax.eval_shape(ex.to_stage, nnx.state(model))
    staged = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), staged,
                          ex.state_shardings(staged))
    args = [staged, ex.masks, *ex.device_inputs(batch.arrays, ops, recv, n_ticks)]
    t0 = time.perf_counter()
    step = ex.cache.get(("grads", sig), *args)
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(staged))
    res = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "dim": a.dim, "layers": a.layers, "seq": a.seq, "images": a.images, "microbatches": a.microbatches,
           "ticks": n_ticks, "attention": attention, "dtype": a.dtype, "params": params, "compile_s": compile_s,
           "executor_temp_bytes": int(mem.temp_size_in_bytes),
           "executor_argument_bytes": int(mem.argument_size_in_bytes),
           "executor_output_bytes": int(mem.output_size_in_bytes)}
    gib = lambda n: f"{n / 2 ** 30:.2f} GiB"
    print(f"backend {res['backend']}, jax {jax.__version__}; dim {a.dim}, layers {a.layers}, seq {a.seq}, "
          f"{a.images} images, {a.microbatches} microbatches, {n_ticks} ticks, attention {attention}, {a.dtype}, "
          f"{params:,} params (abstract)")
    print(f"  executor temp        {gib(res['executor_temp_bytes'])} ({res['executor_temp_bytes']:,} B)")
    print(f"  executor arguments   {gib(res['executor_argument_bytes'])} ({res['executor_argument_bytes']:,} B)")
    print(f"  executor outputs     {gib(res['executor_output_bytes'])}")
    print(f"  compile              {compile_s:9.2f} s")
    return finish(res, step, a, ex)


if __name__ == "__main__":
    sys.exit(main())
