"""Planner: IR validation (with negative controls), baselines, closed forms, the paper's §2
example, DIP search determinism and quality, and the plan CLI."""
import json
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from dip_jax.plan.baselines import BASELINES, classic_order, schedule_baseline
from dip_jax.plan.partition import balanced_split, split_layers
from dip_jax.plan.schedule import B, F, Graph, ModuleChunks, Op, Plan, ScheduleError
from dip_jax.plan.validate import validate
from dip_jax.plan.search import search
from dip_jax.plan.simulate import Costs, simulate


@st.composite
def graphs(draw):
    P = draw(st.integers(2, 8))
    mods = []
    for name, present in (("vision", draw(st.booleans())), ("audio", draw(st.booleans())), ("llm", True),
                          ("dit", draw(st.booleans()))):
        if present:
            K = draw(st.integers(1, 3))
            layers = split_layers(draw(st.integers(P * K, P * K + 5)), P * K)
            backward = draw(st.booleans()) if name in ("vision", "audio") else True
            mods.append(ModuleChunks(name, P * K, layers, backward, draw(st.integers(1, 4))))
    M = draw(st.integers(1, 6))
    subs = tuple(tuple(1 if m.name == "llm" else draw(st.integers(0, 3)) for m in mods) for _ in range(M))
    return Graph(P, tuple(mods), subs)


def random_costs(graph: Graph, seed: int) -> Costs:
    rng = random.Random(seed)
    lat = {(k, m.name, c): rng.uniform(0.5, 2.0) * (2 if k == B else 1)
           for m in graph.modules for c in range(m.chunks) for k in (F, B)}
    return Costs(latency=lambda op: lat[(op.kind, op.module, op.chunk)], p2p=lambda op: 0.01,
                 stored=lambda op: 1.0, working=lambda op: 0.5, static=lambda r: 10.0, tick_overhead=0.01)


@settings(max_examples=40, deadline=None)
@given(graphs(), st.integers(0, 1000))
def test_every_scheduler_produces_valid_plans(graph, seed):
    costs = random_costs(graph, seed)
    for name in BASELINES:
        plan = schedule_baseline(name, graph, costs)
        validate(plan)
        # lock-step timing is one feasible async execution when a tick costs at least a p2p send
        assert simulate(plan, costs, "lockstep").iteration_seconds >= simulate(plan, costs, "async").iteration_seconds - 1e-9
    plan, stats = search(graph, costs, rollouts=3, seed=seed)
    validate(plan)
    assert stats.best_seconds <= stats.default_seconds + 1e-12


@settings(max_examples=40, deadline=None)
@given(graphs(), st.integers(0, 1000), st.sampled_from([None, 12.0, 1e9]))
def test_lockstep_list_scheduler_times_its_plans_exactly(graph, seed, cap):
    """tick_ids' own lock-step time (the search's score) equals the simulator's for its order,
    whatever the priorities; under a binding memory cap it defers to the simulator (None)."""
    from dip_jax.plan.indexed import Indexed
    from dip_jax.plan.interleave import tick_ids
    from dip_jax.plan.simulate import iteration_seconds
    ix = Indexed(graph, random_costs(graph, seed))
    prio = list(range(ix.n))
    random.Random(seed).shuffle(prio)
    order, seconds = tick_ids(ix, prio, cap)
    validate(ix.plan(order, "ticks"))
    if seconds is None:
        assert cap == 12.0
    else:
        assert seconds == pytest.approx(iteration_seconds(ix, order, "lockstep"), rel=1e-12)


def _mixed_graph(P, M, V=1):
    return Graph(P, (ModuleChunks("mixed", P * V, (1,) * (P * V)),), tuple((1,) for _ in range(M)))


def _tiny_valid_plan():
    g = _mixed_graph(2, 2)
    return classic_order("1f1b", g)


@pytest.mark.parametrize("corrupt, kind", [
    (lambda o: (o[0][1:], o[1]), "missing"),
    (lambda o: (o[0] + (o[0][0],), o[1]), "duplicate"),
    (lambda o: (o[0] + (o[1][0],), o[1][1:]), "wrong_rank"),
    (lambda o: (o[0], tuple(reversed(o[1]))), "dependency"),      # B(last) before its own F
    (lambda o: (o[0], o[1] + (Op(F, "mixed", 1, 7),)), "unknown"),
])
def test_validator_rejects_each_corruption(corrupt, kind):
    plan = _tiny_valid_plan()
    validate(plan)
    bad = Plan(plan.graph, corrupt(plan.order))
    with pytest.raises(ScheduleError) as e:
        validate(bad)
    assert e.value.kind == kind


def test_validator_rejects_deadlock():
    g = _mixed_graph(2, 2)
    m = "mixed"
    order = ((Op(F, m, 0, 0), Op(B, m, 0, 0), Op(F, m, 0, 1), Op(B, m, 0, 1)),
             (Op(F, m, 1, 1), Op(F, m, 1, 0), Op(B, m, 1, 0), Op(B, m, 1, 1)))
    # rank 0 waits for B(1, mb0) before F(0, mb1); rank 1 waits for F(0, mb1) before B(1, mb0)
    with pytest.raises(ScheduleError) as e:
        validate(Plan(g, order))
    assert e.value.kind == "deadlock"


def test_validator_rejects_memory_over_cap():
    g = _mixed_graph(4, 8)
    costs = Costs(latency=lambda op: 1.0, stored=lambda op: 1.0, static=lambda r: 0.0)
    validate(classic_order("1f1b", g), costs, memory_cap=4.0)          # 1F1B keeps <= P live
    with pytest.raises(ScheduleError) as e:
        validate(classic_order("gpipe", g), costs, memory_cap=4.0)     # GPipe keeps all M
    assert e.value.kind == "memory"


@pytest.mark.parametrize("P, M, V", [(2, 4, 1), (4, 8, 1), (4, 16, 1), (8, 64, 1), (4, 8, 2), (4, 16, 3), (8, 32, 2)])
def test_closed_form_bubbles(P, M, V):
    g = _mixed_graph(P, M, V)
    costs = Costs(latency=lambda op: 1.0 if op.kind == F else 2.0)
    plan = classic_order("1f1b" if V == 1 else "interleaved_1f1b", g)
    validate(plan)
    tl = simulate(plan, costs, "async")
    assert tl.bubble_fraction == pytest.approx((P - 1) / (V * M + P - 1), abs=1e-9)


def test_closed_form_negative_control_depth_first_chunk_order_misses_it():
    """Running both local chunks of a microbatch back to back (no Megatron grouping) is valid
    but serialises the virtual stages: the closed form must not hold for it."""
    P, M, V = 4, 8, 2
    g = _mixed_graph(P, M, V)
    order = tuple(tuple([Op(F, "mixed", v * P + r, m) for m in range(M) for v in range(V)] +
                        [Op(B, "mixed", v * P + r, m) for m in range(M) for v in reversed(range(V))])
                  for r in range(P))
    plan = Plan(g, order)
    validate(plan)
    costs = Costs(latency=lambda op: 1.0 if op.kind == F else 2.0)
    assert simulate(plan, costs, "async").bubble_fraction > (P - 1) / (V * M + P - 1) + 0.05


def test_paper_section2_example():
    """37B VLM: ViT 64 layers at 6.75 ms, LM 64 layers at 10.5 ms (fwd+bwd) for the example batch."""
    w = [6.75] * 64 + [10.5] * 64
    bounds = [0, *balanced_split(w, 16), 128]
    stages = [sum(w[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert min(stages) == pytest.approx(63.0) and max(stages) == pytest.approx(73.5)
    P, M = 16, 64
    g = _mixed_graph(P, M)
    lat = lambda st: (lambda op: st[op.chunk] / 3 if op.kind == F else 2 * st[op.chunk] / 3)
    imbalanced = simulate(classic_order("1f1b", g), Costs(latency=lat(stages)), "async")
    assert 0.225 <= imbalanced.total_bubble_fraction <= 0.231
    balanced = simulate(classic_order("1f1b", g), Costs(latency=lat([69.0] * 16)), "async")
    assert balanced.total_bubble_fraction == pytest.approx(0.19, abs=0.005)


def test_search_is_deterministic_for_a_rollout_budget():
    g = Graph(4, (ModuleChunks("vision", 8, (2,) * 8, True, 2), ModuleChunks("llm", 4, (4,) * 4, True, 1)),
              tuple((i % 4, 1) for i in range(8)))
    costs = random_costs(g, 3)
    a, sa = search(g, costs, rollouts=12, seed=5)
    b, sb = search(g, costs, rollouts=12, seed=5)
    assert a.order == b.order and sa.best_seconds == sb.best_seconds and sa.rollouts == 12


def test_plan_round_trips_through_json():
    plan, _ = search(Graph(2, (ModuleChunks("vision", 2, (1, 1)), ModuleChunks("llm", 2, (1, 1))),
                           ((2, 1), (0, 1))), Costs(latency=lambda op: 1.0), rollouts=2)
    again = Plan.from_json(json.loads(plan.dumps()))
    assert again == plan


@pytest.mark.parametrize("name", ["vlm_s", "t2v_s"])
def test_plan_cli_dip_beats_baselines(root, tmp_path, name):
    out = tmp_path / name
    res = subprocess.run([sys.executable, "-m", "dip_jax.plan", "--config", f"configs/{name}.py", "--batches", "1",
                          "--rollouts", "4", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "plan_report.json").read_text())
    it = {n: r["batches"][0]["iteration_seconds"] for n, r in report["schedulers"].items()}
    assert set(it) == {"dip", "1f1b", "interleaved_1f1b", "gpipe", "encoders_first"}
    assert all(it["dip"] < t for n, t in it.items() if n != "dip"), it
    for n in it:
        assert (out / f"timeline_{n}.png").stat().st_size > 1000
        trace = json.loads((out / f"timeline_{n}.trace.json").read_text())
        assert any(e.get("ph") == "X" for e in trace["traceEvents"])
    b = report["schedulers"]["dip"]["batches"][0]
    assert set(b) >= {"iteration_seconds", "async_iteration_seconds", "lower_bound_seconds", "bubble_fraction",
                      "peak_memory_bytes", "oom", "plan_seconds"}
    assert len(b["peak_memory_bytes"]) == report["pipe"]


def test_plan_cli_reads_metadata_file(root, tmp_path):
    lines = [json.dumps({"text_tokens": 40 + i % 30, "images": i % 3}) for i in range(400)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    res = subprocess.run([sys.executable, "-m", "dip_jax.plan", "--config", "configs/tiny_cpu.py", "--metadata",
                          str(tmp_path / "m.jsonl"), "--batches", "2", "--rollouts", "2", "--schedulers", "dip,1f1b",
                          "--out", str(tmp_path / "o")], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(json.loads((tmp_path / "o/plan_report.json").read_text())["schedulers"]["dip"]["batches"]) == 2
    bad = subprocess.run([sys.executable, "-m", "dip_jax.plan", "--config", "configs/tiny_cpu.py", "--schedulers",
                          "dip,zigzag"], cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "zigzag" in bad.stderr


def test_parallel_search_is_deterministic_and_no_worse_than_one_worker():
    from dip_jax.plan.search import parallel_search
    g = Graph(4, (ModuleChunks("vision", 8, (2,) * 8, True, 2), ModuleChunks("llm", 4, (4,) * 4, True, 1)),
              tuple((i % 4, 1) for i in range(8)))
    costs = random_costs(g, 4)
    one, s1 = parallel_search(g, costs, 1, rollouts=6, seed=3)
    a, sa = parallel_search(g, costs, 2, rollouts=6, seed=3)
    b, sb = parallel_search(g, costs, 2, rollouts=6, seed=3)
    assert a.order == b.order and sa.rollouts == 12
    assert sa.best_seconds <= s1.best_seconds
    validate(a)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=24), st.integers(1, 4))
def test_replica_balance_is_a_permutation_with_equal_shares(seconds, replicas):
    from dip_jax.plan.replicas import balance
    order = balance(seconds, replicas)
    assert sorted(order) == list(range(len(seconds)))
    if len(seconds) % replicas == 0:
        per = len(seconds) // replicas
        shares = [order[r * per:(r + 1) * per] for r in range(replicas)]
        assert all(s == sorted(s) for s in shares)          # original order within a replica
        # longest-first greedy: the slowest replica exceeds the ideal by at most one microbatch
        loads = [sum(seconds[i] for i in s) for s in shares]
        assert max(loads) <= sum(seconds) / replicas + max(seconds) + 1e-9


def test_replica_balance_spreads_heavy_microbatches():
    from dip_jax.plan.replicas import balance
    # contiguous halves would put both heavy microbatches on replica 0 (load 20 vs 2)
    assert balance([10.0, 10.0, 1.0, 1.0], 2) == [0, 2, 1, 3]
