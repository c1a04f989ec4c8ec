"""What a calibration measures on the running backend, for the cost model.

Two kinds of measurement:
- each module's chunk op alone (jit of embed -> layers -> head, forward; and the backward with
  its recomputed forward, as the executor runs it) on one device, at 1 and 2 layers and at the
  partition's sub-microbatch units and twice them; per module and kind a fixed and a per-layer
  cost at each unit count (interpolated between them), checked on shapes not measured;
- the bytes a stored op keeps (its chunk's residuals, read off the executor's traced step);
- the executor itself on the run's mesh, with synthetic tables (`plan/tables.py`: `idle`,
  `busy`): a step of no ticks (the step's fixed cost), idle ticks (the tick's cost: its loop
  and its packed sends between processes), and ticks in which every rank runs one module's op
  (what the tick loop adds to the op measured alone).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from dip_jax import specs
from dip_jax.config import TrainConfig
from dip_jax.plan import tables as T
from dip_jax.plan.calibrated import Calibration

KINDS = ("F", "B")


def median_seconds(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `reps` calls after `warmup` calls. A fixed count, not one
    adapted to this process's timings: the executor's programs are collective, and every process
    must run them equally often."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# -- one op alone ------------------------------------------------------------------------
def _with_layers(cfg: TrainConfig, layers: int):
    m = cfg.model
    return m.with_modules({name: dataclasses.replace(m.module(name), layers=layers) for name in m.modules})


def _inputs(model_cfg, module: str, units: int, seq_len: int):
    """Random inputs of one op: `units` items of an encoder or the generator, one sequence of
    the backbone (random token ids below the backbone's vocabulary)."""
    rng = np.random.default_rng(0)

    def make(shape, dtype):
        if jnp.issubdtype(dtype, jnp.integer):
            vocab = model_cfg.module(specs.with_role(model_cfg, specs.BACKBONE)).vocab_size
            return jnp.asarray(rng.integers(0, vocab, shape), dtype)
        return jnp.asarray(rng.standard_normal(shape), dtype)
    return specs.get(module).runtime_half().example_input(model_cfg, units, seq_len, make)


def _op_fn(module_obj, kind: str, last: bool):
    """The op as the executor computes it: the embedding in every op (kept only on a first
    chunk), the layers, the head on the last chunk; backward = vjp of that forward."""
    gd, state = nnx.split(module_obj)

    def forward(state, stash, inputs, first):
        mod = nnx.merge(gd, state)
        x = jax.tree.map(lambda a, b: jnp.where(first, a, b), mod.embed(inputs), stash)
        ctx = mod.context(inputs)
        bdef, stack = nnx.split(mod.blocks)
        y = lax.scan(lambda c, p: (mod.step(nnx.merge(bdef, p), c, ctx), None), x, stack)[0]
        return mod.head(y) if last else y

    if kind == "F":
        return state, jax.jit(forward)

    def backward(state, stash, inputs, first):
        out, pull = jax.vjp(lambda s, x: forward(s, x, inputs, first), state, stash)
        return pull(jax.tree.map(jnp.ones_like, out))
    return state, jax.jit(backward)


def _op_call(cfg: TrainConfig, models: dict, module: str, kind: str, layers: int, units: int, last: bool):
    """A no-argument call of the compiled op (compiled by its first call)."""
    if layers not in models:
        models[layers] = _build(cfg, layers)
    mod = getattr(models[layers], module)
    inputs = _inputs(cfg.model, module, units, cfg.data.seq_len)
    stash = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(mod.embed, inputs))
    state, fn = _op_fn(mod, kind, last)
    first = jnp.asarray(False)
    return lambda: fn(state, stash, inputs, first)


def _time_together(calls: dict, rounds: int = 7, budget: float = 2.0, quantile: float = 0.25) -> dict:
    """Seconds of each call, timed round-robin (every round times every call a few times), so
    that a slow stretch of the host hits all shapes alike; the lower quartile of all its times
    (what the op costs when the host leaves it alone: the spread above it is other work)."""
    first = {}
    for k, call in calls.items():
        jax.block_until_ready(call())                       # compiles
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        first[k] = time.perf_counter() - t0
    per_round = budget / rounds / max(len(calls), 1)
    times: dict = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            for _ in range(max(2, min(50, int(per_round / max(first[k], 1e-6))))):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.quantile(v, quantile)) for k, v in times.items()}


def _build(cfg: TrainConfig, layers: int):
    """The model with `layers` layers per module; random values straight from shapes (timing
    does not need the real initialisers, which take seconds on a host)."""
    from dip_jax.models.lmm import abstract_model
    gd, state = nnx.split(abstract_model(_with_layers(cfg, layers)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), state)
    return nnx.merge(gd, state)


def _grid(module: str, unit: int):
    """(unit counts, layer counts) measured, and held-out (layers, units) shapes. The llm's op
    is one sequence; the others are measured at the partition's unit and twice it."""
    if specs.get(module).role == specs.BACKBONE:
        return [1], [1, 2], [(3, 1)]
    unit = max(1, unit)
    return [unit, 2 * unit], [1, 2], [(3, unit), (2, unit + 1)]


def _fit(units: list[int], layers: list[int], t: dict) -> dict:
    """a(u) + b(u) * L through the two layer counts measured at each unit count."""
    (L0, L1) = layers
    b = [(t[(L1, u)] - t[(L0, u)]) / (L1 - L0) for u in units]
    a = [t[(L0, u)] - bu * L0 for u, bu in zip(units, b)]
    return {"units": list(units), "a": a, "b": b}


def measure_ops(cfg: TrainConfig, units: dict[str, int], backward: dict[str, bool], log=print):
    """(ops fits, head fits, accuracy) for every module, on this process's first device."""
    from dip_jax.plan.calibrated import interpolate
    ops, head, acc = {}, {}, {}
    models: dict = {}
    with jax.default_device(jax.local_devices()[0]):
        for m in cfg.model.modules:
            us, Ls, held = _grid(m, units.get(m, 1))
            kinds = KINDS if backward.get(m, True) else ("F",)
            shapes = [(L, u, False) for u in us for L in Ls] + [(Ls[0], us[0], True)] + \
                     [(L, u, False) for L, u in held]
            t = _time_together({(k, *s): _op_call(cfg, models, m, k, *s) for k in kinds for s in shapes})
            ops[m], head[m], acc[m] = {}, {}, {}
            for kind in kinds:
                ops[m][kind] = f = _fit(us, Ls, {(L, u): t[(kind, L, u, False)] for u in us for L in Ls})
                extra = t[(kind, Ls[0], us[0], True)] - t[(kind, Ls[0], us[0], False)]
                head[m][kind] = {"a": 0.0, "b": max(extra, 0.0) / us[0]}
                acc[m][kind] = []
                for L, u in held:
                    meas = t[(kind, L, u, False)]
                    pred = interpolate(f["units"], f["a"], u) + interpolate(f["units"], f["b"], u) * L
                    acc[m][kind].append({"layers": L, "units": u, "predicted": pred, "measured": meas,
                                         "accuracy": 1.0 - abs(pred - meas) / meas})
                per_layer = ", ".join(f"{b * 1e3:.3f}" for b in f["b"])
                log(f"  {m:<7}{kind}  ms per layer at units {us}: {per_layer}; fixed "
                    f"{', '.join(f'{a * 1e3:.3f}' for a in f['a'])}; head {head[m][kind]['b'] * 1e3:.3f} ms/unit; "
                    f"held-out accuracy {np.mean([a['accuracy'] for a in acc[m][kind]]):.1%}")
            if "B" not in ops[m]:               # a module without backward: its B never runs
                ops[m]["B"], head[m]["B"] = ops[m]["F"], head[m]["F"]
        models.clear()
    return ops, head, acc


# -- the executor on the run's mesh -------------------------------------------------------
def measure_runtime(executor, state, arrays: dict, plans: list, ops: dict, head: dict, log=print,
                    store: bool = False):
    """(tick seconds, step seconds, in-executor surcharge per module and kind, stored: None or
    (idle tick of a program with residual slots, per module and kind what a stored op adds
    against the recompute op in the tick loop)). `state` is consumed (the step donates it)."""
    from dip_jax.plan.calibrated import interpolate
    t0 = time.perf_counter()
    _, _, _, sig = executor.tables(plans)
    host_tables = time.perf_counter() - t0
    D = executor.data

    def run(table, n_ticks, sig=sig):
        nonlocal state
        o, r = (np.stack([a] * D) for a in table)
        state, metrics = executor.run_train(state, executor.device_inputs(arrays, o, r, n_ticks), sig)
        return metrics["loss"]

    idle = T.idle(sig)
    n = sig.t_max
    base = median_seconds(lambda: run(idle, 0), 15)
    tick = max((median_seconds(lambda: run(idle, n), 15) - base) / n, 0.0)
    log(f"  step {(base + host_tables) * 1e3:.2f} ms without ticks, {tick * 1e3:.3f} ms per idle tick")
    surcharge = {}
    part = executor.partition
    for mc in part.modules:
        surcharge[mc.name] = {}
        Lc = max(mc.layers)
        for kind in KINDS if mc.backward else ("F",):
            table = T.busy(sig, mc.name, kind)
            per_tick = (median_seconds(lambda: run(table, n), 5) - base) / n
            f, h = ops[mc.name][kind], head[mc.name][kind]
            alone = interpolate(f["units"], f["a"], mc.unit) + interpolate(f["units"], f["b"], mc.unit) * Lc
            # chunk v=0 on every rank: rank P-1 holds the module's last chunk when K == 1
            last = mc.chunks == part.P
            pred = alone + (h["a"] + h["b"] * mc.unit if last else 0.0)
            surcharge[mc.name][kind] = per_tick - tick - pred
            log(f"  {mc.name:<7}{kind}  in the tick loop {(per_tick - tick) * 1e3:8.3f} ms, "
                f"alone {pred * 1e3:8.3f} ms")
            surcharge[mc.name][kind + "_tick"] = per_tick - tick
    stored = None
    if store:
        # the same in a program with residual slots, each op also of the strategy "store"
        rsig = dataclasses.replace(sig, res_slots=tuple(int(b) for b in sig.backward))
        idle_r = T.idle(rsig)
        base_r = median_seconds(lambda: run(idle_r, 0, rsig), 5)
        tick_r = max((median_seconds(lambda: run(idle_r, n, rsig), 5) - base_r) / n, 0.0)
        delta = {}
        for mc in part.modules:
            if not mc.backward:
                continue
            delta[mc.name] = {}
            for kind in KINDS:
                table = T.busy(rsig, mc.name, kind, store=True)
                per_tick = (median_seconds(lambda: run(table, n, rsig), 5) - base_r) / n
                delta[mc.name][kind] = (per_tick - tick_r) - surcharge[mc.name][kind + "_tick"]
                log(f"  {mc.name:<7}{kind}  stored, in the tick loop {(per_tick - tick_r) * 1e3:8.3f} ms "
                    f"({delta[mc.name][kind] * 1e3:+.3f} ms against recompute)")
        log(f"  {tick_r * 1e3:.3f} ms per idle tick with residual slots")
        stored = (tick_r, delta)
    for s in surcharge.values():
        for k in [k for k in s if k.endswith("_tick")]:
            del s[k]
    return tick, base + host_tables, surcharge, stored


def measure_residuals(executor, state, arrays: dict, plans: list, log=print) -> dict:
    """Bytes per device one stored op keeps, per module, as the executor's traced step has them
    (exact, not timed), as a per-layer cost at the partition's unit: the cost model's residual
    bytes under the strategy "store"."""
    out = executor.residual_profile(state, arrays, plans)
    depth = {m.name: max(m.layers) for m in executor.partition.modules}
    log("  residuals of a stored op: " + ", ".join(f"{m} {f['b'][0] * depth[m] / 2 ** 20:.2f} MiB"
                                                  for m, f in out.items()))
    return out


def settle(cal: Calibration, executor, state, arrays: dict, plans: list, model_cfg, hw, tp: int,
           seq_len: int, log=print) -> Calibration:
    """`cal` scaled so that a real plan's step is predicted as measured. The synthetic tables
    measure each cost with every rank doing the same thing every tick; a real plan mixes ranks
    with and without ops, and its sends overlap other ranks' work, so the level (not the relative
    costs of ops, ticks and the step) is pinned by one real step (fixed repetitions: every process
    runs it)."""
    from dip_jax.plan.cost import CostModel
    from dip_jax.plan.simulate import simulate
    ops, recv, n_ticks, sig = executor.tables(plans)

    def run():
        nonlocal state
        state, metrics = executor.run_train(state, executor.device_inputs(arrays, ops, recv, n_ticks), sig)
        return metrics["loss"]
    measured = median_seconds(run, 5)
    costs = executor.partition.costs(CostModel(model_cfg, hw, tp, seq_len, cal), model_cfg)
    predicted = max(simulate(p, costs, "lockstep").iteration_seconds for p in plans)
    scale = measured / predicted
    log(f"  a real plan: measured {measured * 1e3:.1f} ms, predicted {predicted * 1e3:.1f} ms; costs scaled by {scale:.3f}")
    # memory: what the compiled program holds beyond the planner's count of its buffers (XLA's
    # temporaries, the boundary buffers, the batch and tables), charged to every program
    from dip_jax.plan.memory import program_bytes as planned_bytes
    from dip_jax.runtime.cache import program_bytes
    args = (state, executor.masks, *executor.device_inputs(arrays, ops, recv, n_ticks))
    compiled = program_bytes(executor.cache.get(("train", sig), *args))
    counted = max(planned_bytes(p, costs) for p in plans)
    log(f"  its compiled step holds {compiled / 2 ** 20:.1f} MiB per device, the planner counts {counted / 2 ** 20:.1f} MiB")
    return dataclasses.replace(cal, scale=scale, program_extra_bytes=max(compiled - counted, 0.0))
