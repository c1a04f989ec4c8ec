"""The memory strategy per op: stored residuals against recomputation, in the IR, the tables,
the executor (against jax.value_and_grad of the unpipelined model) and the planner's choice.

Any mix of stored and recomputed op pairs on random valid schedules, all four modules, data=2,
must give the reference loss and every gradient; a stored backward reading another residual
slot must not. The choice must keep every rank's simulated memory under the cap, store
everything when the cap allows it and nothing when it allows nothing, and come within its
proven gap of the exhaustive optimum on small instances.
"""
import dataclasses
import itertools
import random
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dip_jax.plan import tables as T
from dip_jax.plan.memory import GAP, choose, stored_fraction
from dip_jax.plan.schedule import B, F, Graph, ModuleChunks, Op, Plan, ScheduleError
from dip_jax.plan.simulate import Costs, simulate
from dip_jax.plan.validate import validate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_executor import BLK, Setup, random_plan  # noqa: E402

RES = 8       # residual slots per module: one compiled program for every mix below


def store_some(plan: Plan, rng: random.Random, p: float) -> Plan:
    pairs = [op for op in plan.graph.ops() if op.kind == F and plan.graph.module(op.module).backward]
    return dataclasses.replace(plan, stored=frozenset(op for op in pairs if rng.random() < p))


@pytest.fixture(scope="module")
def everything():
    s = Setup(("vision", "audio", "dit"), data=2)
    s.buckets = dict(s.buckets, res={m: RES for m in s.cfg.model.modules})
    return s


# -- executor -------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_any_mix_of_stored_and_recomputed_ops_matches_reference(everything, seed, p):
    rng = random.Random(seed)
    plans = [store_some(pl, rng, p) for pl in everything.plans(lambda g: random_plan(g, seed))]
    everything.assert_matches(*everything.run(plans))


# the block families pretrained checkpoints bring (LayerNorm, a GELU MLP, biases on every linear,
# a tied head, scaled rope): storing a chunk's residuals keeps them exact too
FAMILY = dict(BLK, norm="layer", norm_eps=1e-5, mlp="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True)


def test_block_families_store_and_recompute_exactly():
    s = Setup(("vision", "audio"), data=1, blk=FAMILY, random_biases=True,
              llm=dict(tie_embeddings=True, rope_scaling=(("factor", 2.0), ("rope_type", "linear"))))
    s.buckets = dict(s.buckets, res={m: RES for m in s.cfg.model.modules})
    for seed, p in ((11, 0.5), (12, 1.0)):
        rng = random.Random(seed)
        plans = [store_some(pl, rng, p) for pl in s.plans(lambda g: random_plan(g, seed))]
        assert any(pl.stored for pl in plans)
        s.assert_matches(*s.run(plans))


def test_one_program_serves_every_mix(everything):
    before = everything.ex.cache.stats.compiled
    for seed, p in ((1, 0.5), (2, 1.0), (3, 0.0)):
        rng = random.Random(seed)
        everything.run([store_some(pl, rng, p) for pl in everything.plans(lambda g: random_plan(g, seed))])
    assert everything.ex.cache.stats.compiled - before <= 1, everything.ex.cache.stats


def test_a_tick_with_residual_slots_stays_within_the_lint(everything):
    """Stored and recomputed ops in one program: still three host syncs and no carried buffer
    (the residual slots among them) copied inside the tick loop."""
    from test_executor import assert_tick_lint
    rng = random.Random(4)
    plans = [store_some(pl, rng, 0.5) for pl in everything.plans(lambda g: random_plan(g, 4))]
    assert any(pl.stored for pl in plans)
    assert_tick_lint(everything, plans)


def test_backward_reading_another_residual_slot_breaks_equivalence(everything):
    """Negative control: the same tables with one stored backward pointed at another slot."""
    rng = random.Random(5)
    plans = [store_some(pl, rng, 1.0) for pl in everything.plans(lambda g: random_plan(g, 5))]
    ops, recv, n_ticks, sig = everything.ex.tables(plans, everything.buckets)
    loss, grads = everything.ex.run_tables(everything.params, everything.batch.arrays, ops, recv, n_ticks, sig)
    everything.assert_matches(loss, grads)           # as lowered: exact
    broken = ops.copy()
    hits = np.argwhere((broken[..., T.B_ON] == 1) & (broken[..., T.B_STORE] == 1))
    d, t, r = hits[len(hits) // 2]
    broken[d, t, r, T.B_RES] = (broken[d, t, r, T.B_RES] + 1) % RES
    loss, grads = everything.ex.run_tables(everything.params, everything.batch.arrays, broken, recv, n_ticks, sig)
    with pytest.raises(AssertionError):
        everything.assert_matches(loss, grads)


def test_planner_choice_under_a_cap_runs_exactly(everything):
    """The planner's own choice (auto, a cap that stores some ops and not others) executes exactly."""
    from dip_jax.plan.partition import ModalityPartition  # noqa: F401  (the Setup's partition)
    from dip_jax.plan.cost import CostModel
    from dip_jax.plan.hardware import resolve
    hw, _ = resolve("cpu")
    costs = everything.partition.costs(CostModel(everything.cfg.model, hw, 1, 48), everything.cfg.model)
    plans = everything.plans(lambda g: random_plan(g, 9))
    floor = max(max(simulate(p, costs).peak_memory) for p in plans)
    full = max(max(simulate(choose(p, costs, 1e30, "store")[0], costs).peak_memory) for p in plans)
    cap = (floor + full) / 2
    chosen = [choose(p, costs, cap, "auto")[0] for p in plans]
    fractions = [stored_fraction(p) for p in chosen]
    assert all(0 < f < 1 for f in fractions), fractions
    assert all(max(simulate(p, costs).peak_memory) <= cap * (1 + 1e-9) for p in chosen)
    everything.assert_matches(*everything.run(chosen))


# -- IR and tables ------------------------------------------------------------------------
def small_graph(P=2, mbs=3):
    mods = (ModuleChunks("vision", 2 * P, (1,) * 2 * P, True, 1), ModuleChunks("llm", 2 * P, (2,) * 2 * P, True, 1))
    return Graph(P, mods, tuple((1 + mb % 2, 1) for mb in range(mbs)))


def test_plan_json_keeps_the_strategy():
    plan = store_some(random_plan(small_graph(), 0), random.Random(0), 0.5)
    assert plan.stored
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.stored == plan.stored
    assert Plan.from_json({k: v for k, v in plan.to_json().items() if k != "stored"}).stored == frozenset()
    op = next(iter(plan.stored))
    assert plan.strategy(op) == "store" and plan.strategy(Op(B, *dataclasses.astuple(op)[1:])) == "store"


def test_validation_rejects_what_cannot_store():
    plan = random_plan(small_graph(), 1)
    with pytest.raises(ScheduleError, match="strategy"):
        validate(dataclasses.replace(plan, stored=frozenset({Op(B, "llm", 0, 0)})))
    frozen = Graph(2, (ModuleChunks("vision", 4, (1,) * 4, False, 1), ModuleChunks("llm", 4, (2,) * 4, True, 1)),
                   ((1, 1),))
    plan = random_plan(frozen, 0)
    with pytest.raises(ScheduleError, match="strategy"):
        validate(dataclasses.replace(plan, stored=frozenset({Op(F, "vision", 0, 0)})))


def test_lowering_stored_ops():
    """A storing forward frees its stash slot when it runs and holds a residual slot until its
    backward, which reads no stash; a recompute-only plan lowers to no residual slots."""
    plan = random_plan(small_graph(mbs=4), 2)
    none, every = T.lower(plan), T.lower(store_some(plan, random.Random(0), 1.0))
    assert none.signature.res_slots == (0, 0)
    assert all(n > 0 for n in every.signature.res_slots)
    assert sum(every.signature.stash_slots) <= sum(none.signature.stash_slots)
    b_on, f_on = every.ops[..., T.B_ON] == 1, every.ops[..., T.F_ON] == 1
    assert (every.ops[..., T.B_STORE][b_on] == 1).all() and (every.ops[..., T.F_STORE][f_on] == 1).all()
    trash = np.array(every.signature.stash_slots)[every.ops[..., T.B_MOD]]
    assert (every.ops[..., T.B_IN][b_on] == trash[b_on]).all()
    # each stored backward reads the slot its forward wrote, and no slot holds two live residuals
    tick = T.ticks_of(plan)
    written = {}
    for (t, r) in zip(*np.nonzero(f_on)):
        o = every.ops[t, r]
        written[(r, int(o[T.F_MOD]), int(o[T.F_V]), int(o[T.F_MB]), int(o[T.F_SUB]))] = (t, int(o[T.F_RES]))
    for (t, r) in zip(*np.nonzero(b_on)):
        o = every.ops[t, r]
        t_f, slot = written[(r, int(o[T.B_MOD]), int(o[T.B_V]), int(o[T.B_MB]), int(o[T.B_SUB]))]
        assert slot == o[T.B_RES] and t_f < t
    assert len(tick) == b_on.sum() + f_on.sum()


def test_simulation_charges_each_strategy():
    g = small_graph()
    costs = Costs(latency=lambda op: 1.0 if op.kind == F else 3.0, latency_stored=lambda op: 1.0 if op.kind == F else 2.0,
                  stored=lambda op: 1.0, residual=lambda op: 5.0, working=lambda op: 4.0)
    plan = random_plan(g, 3)
    pairs = sum(1 for op in g.ops() if op.kind == B)
    rec, sto = simulate(plan, costs), simulate(choose(plan, costs, 1e30, "store")[0], costs)
    assert sum(sto.busy_seconds) == pytest.approx(sum(rec.busy_seconds) - pairs)
    assert max(sto.peak_memory) > max(rec.peak_memory)
    assert sto.iteration_seconds < rec.iteration_seconds


# -- the choice ---------------------------------------------------------------------------
def _instance(seed):
    rng = random.Random(seed)
    g = small_graph(P=2, mbs=rng.randint(2, 4))
    save = {op: rng.uniform(0.2, 1.5) for op in g.ops()}
    res = {op: rng.uniform(1.0, 6.0) for op in g.ops()}
    costs = Costs(latency=lambda op: 1.0 if op.kind == F else 2.0 + save[op],
                  latency_stored=lambda op: 1.0 if op.kind == F else 2.0, stored=lambda op: 1.0,
                  residual=lambda op: res[op], working=lambda op: 2.0, static=lambda r: 3.0)
    return random_plan(g, seed), costs


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10 ** 6), st.floats(0.0, 1.0))
def test_choice_fits_the_cap_and_is_near_optimal(seed, where):
    plan, costs = _instance(seed)
    floor = max(simulate(plan, costs).peak_memory)
    full = max(simulate(choose(plan, costs, 1e30, "store")[0], costs).peak_memory)
    cap = floor + where * (full - floor)
    chosen, info = choose(plan, costs, cap, "auto")
    tl = simulate(chosen, costs)
    assert max(tl.peak_memory) <= cap * (1 + 1e-9)
    if where == 1.0:
        assert chosen.stored == choose(plan, costs, 1e30, "store")[0].stored
    # against every subset of one rank's pairs, the other rank's choice fixed (2^pairs <= 2^10)
    g = plan.graph
    for r in range(g.P):
        mine = [op for op in g.ops() if op.kind == F and g.rank(op) == r]
        if len(mine) > 10:
            continue
        others = frozenset(op for op in chosen.stored if g.rank(op) != r)
        best = None
        for bits in itertools.product((0, 1), repeat=len(mine)):
            trial = dataclasses.replace(plan, stored=others | {op for op, b in zip(mine, bits) if b})
            t = simulate(trial, costs)
            if t.peak_memory[r] <= cap * (1 + 1e-9):
                best = t.busy_seconds[r] if best is None else min(best, t.busy_seconds[r])
        assert tl.busy_seconds[r] <= best * (1 + GAP) + 1e-9, (r, tl.busy_seconds[r], best)


def test_choice_extremes_and_modes():
    plan, costs = _instance(7)
    assert choose(plan, costs, 0.0, "auto")[0].stored == frozenset()          # no room: recompute
    assert choose(plan, costs, 1e30, "recompute")[0].stored == frozenset()
    everything = choose(plan, costs, 1e30, "auto")
    assert everything[1].fraction == 1.0 and everything[1].stored == everything[1].pairs
    with pytest.raises(ValueError, match="memory strategy"):
        choose(plan, costs, 1e30, "offload")
    no_store = dataclasses.replace(costs, latency_stored=None)                  # costs of no runtime that stores
    assert choose(plan, no_store, 1e30, "store")[0].stored == frozenset()


def test_choice_keeps_the_compiled_buffers_under_the_cap():
    """For the executor (program=True): the step's slot buffers, power-of-two sized and held for
    the whole step, fit the cap too."""
    from dip_jax.plan.memory import program_bytes
    for seed in range(6):
        plan, costs = _instance(seed)
        floor = program_bytes(plan, costs)
        full = program_bytes(choose(plan, costs, 1e30, "store")[0], costs)
        assert full > floor
        for where in (0.3, 0.6):
            cap = floor + where * (full - floor)
            chosen, _ = choose(plan, costs, cap, "auto", program=True)
            assert program_bytes(chosen, costs) <= cap, (seed, where)
            assert max(simulate(chosen, costs).peak_memory) <= cap * (1 + 1e-9)


def test_choice_stores_nothing_when_storing_slows_the_step():
    plan, costs = _instance(3)
    assert choose(plan, costs, 1e30, "auto")[0].stored
    slow = dataclasses.replace(costs, tick_overhead_stored=100.0)     # every tick of a storing program
    assert choose(plan, slow, 1e30, "auto")[0].stored == frozenset()
    assert choose(plan, slow, 1e30, "store")[0].stored                 # forced: stored anyway


def test_busy_tables_of_stored_ops():
    plan = store_some(random_plan(small_graph(), 4), random.Random(1), 1.0)
    sig = T.lower(plan).signature
    ops, _ = T.busy(sig, "llm", B, store=True)
    assert (ops[..., T.B_STORE] == 1).all() and (ops[..., T.B_RES] == sig.residual_slots("llm")).all()
    with pytest.raises(ValueError, match="residual slots"):
        T.busy(T.lower(random_plan(small_graph(), 4)).signature, "llm", B, store=True)
