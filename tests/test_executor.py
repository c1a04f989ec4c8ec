"""The table-driven pipeline executor against jax.value_and_grad of the unpipelined model.

Every scheduler, DIP plans and random valid schedules must give the reference loss and every
gradient (fp32) on a vision + audio + llm model (pipe=4) and on all four modules with two
data-parallel replicas (data=2 x pipe=4). Negative controls corrupt a table and must fail.
One compiled program per configuration serves every plan (fixed buckets).
"""
import random
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st

from dip_jax.config import AudioConfig, DataConfig, DiTConfig, LLMConfig, MeshConfig, ModelConfig, TrainConfig, VisionConfig
from dip_jax.data.pipeline import PackedBatches
from dip_jax.models.lmm import LMM
from dip_jax.plan import tables as T
from dip_jax.plan.baselines import BASELINES, schedule_baseline
from dip_jax.plan.interleave import Policy, interleave
from dip_jax.plan.partition import ModalityPartition, split_layers
from dip_jax.plan.schedule import ModuleChunks
from dip_jax.plan.search import search
from dip_jax.plan.simulate import Costs
from dip_jax.plan.workload import workload_from_metadata
from dip_jax.runtime import executor, hlo
from dip_jax.runtime.mesh import make_mesh
from dip_jax.runtime.pipeline import PipelineExecutor

BLK = dict(dim=32, mlp_hidden=48, heads=4, kv_heads=2)
UNIT = {"vision": 2, "audio": 1, "llm": 1, "dit": 2}
K = {"vision": 1, "audio": 1, "llm": 2, "dit": 1}
UNIT_COSTS = Costs(latency=lambda op: 1.0 if op.kind == "F" else 2.0)


class Setup:
    def __init__(self, modules, data, pipe=4, tensor=1, blk=BLK, llm=None, random_biases=False):
        BLK = blk
        self.cfg = TrainConfig(
            model=ModelConfig(
                vision=VisionConfig(layers=5, image_size=8, patch_size=4, channels=1, spatial_merge=1, **BLK)
                if "vision" in modules else None,
                audio=AudioConfig(layers=4, mel_bins=8, frames_per_second=16, **BLK) if "audio" in modules else None,
                llm=LLMConfig(layers=9, vocab_size=64, **BLK, **(llm or {})),
                dit=DiTConfig(layers=4, latent_channels=4, latent_frames_per_second=2, tokens_per_frame=2,
                              cond_tokens=6, time_embed_dim=16, **BLK) if "dit" in modules else None),
            mesh=MeshConfig(data=data, pipe=pipe, tensor=tensor),
            data=DataConfig(seq_len=48, microbatches=4 * data, max_images=4, max_audio_clips=2, max_video_clips=3))
        self.model = LMM(self.cfg.model, nnx.Rngs(0))
        self.params = nnx.state(self.model)
        if random_biases:        # biases start at zero: nothing would tell where they are added
            key = jax.random.key(7)
            self.params = jax.tree_util.tree_map_with_path(
                lambda p, x: 0.1 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(p).encode())),
                                                     x.shape) if "['bias']" in jax.tree_util.keystr(p) else x,
                self.params)
            nnx.update(self.model, self.params)
        self.batch = PackedBatches(self.cfg)(1)
        graphdef = nnx.graphdef(self.model)
        self.ref = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(self.batch.arrays)[0]))(self.params)
        mods = self.cfg.model.modules
        self.partition = ModalityPartition(pipe, tuple(
            ModuleChunks(m, pipe * K[m], split_layers(getattr(self.cfg.model, m).layers, pipe * K[m]), True, UNIT[m])
            for m in mods))
        self.ex = PipelineExecutor(self.model, self.partition, make_mesh(data, pipe, tensor),
                                   {"vision": 4, "audio": 2, "dit": 3}, 48)
        self.data, self.M = data, 4
        self.graphs = [self.partition.graph(workload_from_metadata(self.cfg, self.batch.metadata[d * 4:(d + 1) * 4]))
                       for d in range(data)]
        n_ops = max(len(g.ops()) for g in self.graphs)
        self.buckets = {"stash": {m: 16 for m in mods}, "cot": {m: 8 for m in mods}, "boundary": 4, "cond": 4,
                        "t_max": T.bucket(n_ops, 8)}

    def plans(self, make):
        return [make(g) for g in self.graphs]

    def run(self, plans):
        return self.ex.value_and_grad(self.params, self.batch.arrays, plans, self.buckets)

    def assert_matches(self, loss, grads, rtol=1e-5, atol=1e-6):
        ref_loss, ref_grads = self.ref
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=rtol)
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=atol,
                                       err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def encoders():
    return Setup(("vision", "audio"), data=1)


@pytest.fixture(scope="module")
def everything():
    return Setup(("vision", "audio", "dit"), data=2)


def random_plan(graph, seed):
    rng = random.Random(seed)
    keys = {op: rng.random() for op in graph.ops()}
    return interleave(graph, UNIT_COSTS, Policy("random", lambda op: (keys[op],), alternate=rng.random() < 0.5))


@pytest.mark.parametrize("scheduler", [*BASELINES, "dip"])
def test_schedulers_match_reference_encoders(encoders, scheduler):
    make = (lambda g: search(g, UNIT_COSTS, rollouts=4, seed=1)[0]) if scheduler == "dip" else \
        (lambda g: schedule_baseline(scheduler, g, UNIT_COSTS))
    encoders.assert_matches(*encoders.run(encoders.plans(make)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2 ** 31 - 1))
def test_random_valid_schedules_match_reference(encoders, seed):
    encoders.assert_matches(*encoders.run(encoders.plans(lambda g: random_plan(g, seed))))


def test_one_compiled_program_for_every_plan_of_a_signature(encoders):
    for seed in range(3):
        encoders.run(encoders.plans(lambda g: random_plan(g, 100 + seed)))
    assert encoders.ex.cache.stats.compiled == 1, encoders.ex.cache.stats
    assert encoders.ex.cache.stats.hits >= 3


def _corrupt(setup, how):
    plans = setup.plans(lambda g: schedule_baseline("gpipe", g, UNIT_COSTS))
    ops, recv, n_ticks, sig = setup.ex.tables(plans, setup.buckets)
    ops, recv = ops.copy(), recv.copy()
    if how == "slot":           # a backward reads another microbatch's stashed input
        d, t, r = np.argwhere((ops[..., T.B_ON] == 1) & (ops[..., T.B_V] >= 0) & (ops[..., T.B_IN] < 16))[0]
        ops[d, t, r, T.B_IN] = (ops[d, t, r, T.B_IN] + 1) % 16
    elif how == "drop":         # a backward op vanishes
        d, t, r = np.argwhere(ops[..., T.B_ON] == 1)[len(np.argwhere(ops[..., T.B_ON] == 1)) // 2]
        ops[d, t, r, T.B_ON] = 0
    elif how == "truncate":
        n_ticks -= 1
    return setup.ex.run_tables(setup.params, setup.batch.arrays, ops, recv, n_ticks, sig)


@pytest.mark.parametrize("how", ["slot", "drop", "truncate"])
def test_negative_controls_break_equivalence(encoders, how):
    loss, grads = _corrupt(encoders, how)
    with pytest.raises(AssertionError):
        encoders.assert_matches(loss, grads)


@pytest.mark.parametrize("scheduler", ["gpipe", "1f1b", "dip", "random"])
def test_all_modules_two_replicas_match_reference(everything, scheduler):
    if scheduler == "dip":
        make = lambda g: search(g, UNIT_COSTS, rollouts=3, seed=2)[0]
    elif scheduler == "random":
        make = lambda g: random_plan(g, 7)
    else:
        make = lambda g: schedule_baseline(scheduler, g, UNIT_COSTS)
    everything.assert_matches(*everything.run(everything.plans(make)))
    assert everything.ex.cache.stats.compiled == 1


def _reachable(hlo: str, root: str) -> set[str]:
    comps = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        todo += re.findall(r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)",
                           comps[c])
        for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[c]):
            todo += [x.strip().lstrip("%") for x in group.split(",")]
    return seen


def test_hlo_loop_has_no_all_reduce_and_no_whole_buffer_copies(encoders):
    plans = encoders.plans(lambda g: schedule_baseline("gpipe", g, UNIT_COSTS))
    ops, recv, n_ticks, sig = encoders.ex.tables(plans, encoders.buckets)
    encoders.run(plans)                                  # compiled (or found) in the cache
    hlo = encoders.ex.cache._programs[("grads", sig)].as_text()
    comps = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    loops = [b for b in re.findall(r"body=%?([\w.\-]+)", hlo)
             if any("collective-permute" in comps.get(c, "") for c in _reachable(hlo, b))]
    assert loops, "no tick loop found"
    tick_loop = max(loops, key=lambda b: len(_reachable(hlo, b)))
    body = "\n".join(comps[c] for c in _reachable(hlo, tick_loop))
    assert "all-reduce" not in body, "an all-reduce runs inside the tick loop"
    assert "all-reduce" in hlo, "the gradient reduction after the loop is missing"
    # no copy of a whole per-rank gradient/parameter stack: the llm holds K=2 chunks per rank, so
    # a copy of its [K, Lc, ...] stack would be a whole-buffer copy (for K=1 modules a chunk-sized
    # copy per backward op is the same size as the stack and is not what this guards against)
    stacks = encoders.ex.to_stage(encoders.params)
    whole = {tuple(a.shape[1:]) for a in jax.tree.leaves(stacks["llm"]["blocks"])}
    assert all(s[0] == K["llm"] > 1 for s in whole)
    copies = {tuple(int(x) for x in shape.split(",")) for shape in re.findall(r"= f32\[([\d,]+)\][^\n]* copy\(", body)}
    assert not copies & whole, f"whole gradient/parameter stack copied in the tick loop: {sorted(copies & whole)}"


def assert_tick_lint(setup, plans, ex=None):
    """The compiled step of `plans`: at most three host-synchronising ops (the tick loop's own
    condition and one switch per op kind) and no copy of a buffer the tick loop carries."""
    ex = ex or setup.ex
    ops, recv, n_ticks, sig = ex.tables(plans, setup.buckets)
    ex.run_tables(setup.params, setup.batch.arrays, ops, recv, n_ticks, sig)
    text = ex.cache._programs[("grads", sig)].as_text()
    syncs = hlo.host_sync_ops(text)
    assert len(syncs) <= 3, [i.text[:120] for i in syncs]
    assert sorted(i.op for i in syncs) == ["conditional", "conditional", "while"], [i.op for i in syncs]
    copies = hlo.loop_buffer_copies(text)
    assert not copies, [i.text[:120] for i in copies]
    return text


@pytest.mark.parametrize("which", ["encoders", "everything"])
def test_a_tick_syncs_with_the_host_three_times_and_copies_no_carried_buffer(which, request):
    """vision + audio + llm at pipe=4, and all four modules at data=2 x pipe=4."""
    setup = request.getfixturevalue(which)
    assert_tick_lint(setup, setup.plans(lambda g: schedule_baseline("1f1b", g, UNIT_COSTS)))


def test_the_tick_lint_sees_copies_and_host_syncs(encoders, monkeypatch):
    """Negative controls. (1) The executor reading each stash row with its own slice (as it
    did): XLA copies those buffers, twice, every tick. (2) A loop with a dynamic trip count
    holding three predicated conditionals and a scan: four host syncs, the scan not among them.
    (3) A three-branch switch that carries a buffer: copied on this XLA."""
    monkeypatch.setattr(executor, "take2", lambda tree, i, j: (executor.take(tree, i), executor.take(tree, j)))
    broken = PipelineExecutor(encoders.model, encoders.partition, make_mesh(1, 4), {"vision": 4, "audio": 2, "dit": 3}, 48)
    with pytest.raises(AssertionError, match="copy"):
        assert_tick_lint(encoders, encoders.plans(lambda g: schedule_baseline("1f1b", g, UNIT_COSTS)), broken)

    def body(t, c):
        for k in range(3):
            c = jax.lax.cond(t % (k + 2) == 0, lambda c: c * 2.0, lambda c: c, c)
        return jax.lax.scan(lambda c, _: (c + 1.0, None), c, None, length=3)[0]
    text = jax.jit(lambda n, c: jax.lax.fori_loop(0, n, body, c)).lower(3, jnp.ones(4)).compile().as_text()
    assert sorted(i.op for i in hlo.host_sync_ops(text)) == ["conditional"] * 3 + ["while"]

    put = lambda a, i, x: jax.lax.dynamic_update_index_in_dim(a, x, i, 0)
    def switch_body(t, A):
        return jax.lax.switch(t % 3, [lambda A: A, lambda A: put(A, t % 4, A[t % 4] * 2.0),
                                      lambda A: put(A, t % 4, A[t % 4] + 1.0)], A)
    text = jax.jit(lambda n, A: jax.lax.fori_loop(0, n, switch_body, A)).lower(3, jnp.ones((4, 1024))).compile().as_text()
    assert hlo.loop_buffer_copies(text)


def test_layer_remat_is_exact_and_keeps_less(encoders):
    """pipeline.remat=layers: each layer's forward runs again in the backward, from its input
    alone; the same loss and gradients, a smaller working set than the chunk's residuals (what
    auto keeps for these small chunks)."""
    plans = encoders.plans(lambda g: schedule_baseline("1f1b", g, UNIT_COSTS))
    layers = PipelineExecutor(encoders.model, encoders.partition, make_mesh(1, 4), {"vision": 4, "audio": 2, "dit": 3},
                              48, remat="layers")
    encoders.assert_matches(*layers.value_and_grad(encoders.params, encoders.batch.arrays, plans, encoders.buckets))
    encoders.run(plans)
    sig = encoders.ex.tables(plans, encoders.buckets)[3]
    temp = lambda ex: ex.cache._programs[("grads", sig)].memory_analysis().temp_size_in_bytes
    assert set(encoders.ex.remat_chosen.values()) == {"chunk"} and set(layers.remat_chosen.values()) == {"layers"}
    assert temp(layers) < temp(encoders.ex), (temp(layers), temp(encoders.ex))


def _tick_loop_permutes(ex, setup, plans) -> int:
    ops, recv, n_ticks, sig = ex.tables(plans, setup.buckets)
    ex.run_tables(setup.params, setup.batch.arrays, ops, recv, n_ticks, sig)
    hlo = ex.cache._programs[("grads", sig)].as_text()
    comps = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    loops = [b for b in re.findall(r"body=%?([\w.\-]+)", hlo)
             if any("collective-permute" in comps.get(c, "") for c in _reachable(hlo, b))]
    tick_loop = max(loops, key=lambda b: len(_reachable(hlo, b)))
    body = "\n".join(comps[c] for c in _reachable(hlo, tick_loop))
    return len(re.findall(r" collective-permute(?:-start)?\(", body))


def _reduction_operands(ex, setup, plans) -> list[int]:
    """Operands of each all-reduce of the program (gloo runs a tuple all-reduce one by one)."""
    sig = ex.tables(plans, setup.buckets)[3]
    hlo = ex.cache._programs[("grads", sig)].as_text()
    return [len(re.findall(r"[fs]\d+\[", m)) for m in re.findall(r"%[\w.\-]+ = (.*?) all-reduce\(", hlo)]


def test_one_collective_per_direction_and_tick(encoders):
    """All channels of a direction (activations, encoder outputs, cotangents of every module)
    travel in one packed ppermute: 2 per tick, not one per channel; after the loop, the
    gradients (and the loss) are reduced in one buffer per sharding, not leaf by leaf."""
    plans = encoders.plans(lambda g: schedule_baseline("gpipe", g, UNIT_COSTS))
    assert _tick_loop_permutes(encoders.ex, encoders, plans) == 2
    packed = _reduction_operands(encoders.ex, encoders, plans)
    assert packed and max(packed) == 1, packed
    # negative control: one collective per channel, one reduction operand per gradient leaf
    unpacked = PipelineExecutor(encoders.model, encoders.partition, make_mesh(1, 4), {"vision": 4, "audio": 2, "dit": 3},
                                48, packed_channels=False)
    assert _tick_loop_permutes(unpacked, encoders, plans) > 2
    assert max(_reduction_operands(unpacked, encoders, plans)) > 2


def test_200_dynamic_batches_need_at_most_4_programs(root):
    """DIP plans of 200 synthetic batches (varying image/audio counts) lower to <= 4 signatures,
    i.e. <= 4 compiled programs; the executor compiles one per signature (test above)."""
    from dip_jax.config.overrides import load_config_file
    from dip_jax.plan.schedulers import PlanContext
    cfg = load_config_file(root / "configs/tiny_cpu.py")
    ctx = PlanContext(cfg)
    src = PackedBatches(cfg, content=False)
    D, M = cfg.mesh.data, cfg.data.microbatches // cfg.mesh.data
    signatures, compositions, buckets = set(), set(), None
    for i in range(200):
        meta = src.metadata(i)
        compositions.add(tuple(sum(s.images for s in mb) for mb in meta))
        plans = [ctx.plan(meta[d * M:(d + 1) * M], "dip", rollouts=1, seed=i).plan for d in range(D)]
        fit = T.buckets_for(plans)
        buckets = fit if buckets is None else T.widen(fit, buckets)     # what the executor does
        signatures.add(T.lower(plans[0], buckets).signature)
    assert len(compositions) > 50, "the data is dynamic"
    assert len(signatures) <= 4, signatures


def test_frozen_encoder_gets_no_backward_and_no_gradient(encoders):
    """Vision frozen: no vision backward ops, zero vision gradients, all others as the reference."""
    import dataclasses
    frozen = ModalityPartition(4, tuple(dataclasses.replace(m, backward=m.name != "vision")
                                        for m in encoders.partition.modules))
    ex = PipelineExecutor(encoders.model, frozen, make_mesh(1, 4), {"vision": 4, "audio": 2, "dit": 3}, 48)
    graph = frozen.graph(workload_from_metadata(encoders.cfg, encoders.batch.metadata[:4]))
    assert not any(op.kind == "B" and op.module == "vision" for op in graph.ops())
    loss, grads = ex.value_and_grad(encoders.params, encoders.batch.arrays,
                                    [schedule_baseline("1f1b", graph, UNIT_COSTS)], encoders.buckets)
    ref_loss, ref_grads = encoders.ref
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads["vision"]))
    for m in ("audio", "llm"):
        for g, r in zip(jax.tree.leaves(grads[m]), jax.tree.leaves(ref_grads[m])):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_forward_only_tables_give_the_reference_loss(everything):
    """Evaluation's forward-only plans (no backward ops, no gradient buffers): the same loss."""
    import dataclasses
    fwd = dataclasses.replace(everything.partition, modules=tuple(
        dataclasses.replace(m, backward=False) for m in everything.partition.modules))
    plans = [search(fwd.graph(workload_from_metadata(everything.cfg, everything.batch.metadata[d * 4:(d + 1) * 4])),
                    UNIT_COSTS, rollouts=2, seed=0)[0] for d in range(2)]
    assert not any(op.kind == "B" for p in plans for ops in p.order for op in ops)
    loss = everything.ex.loss(everything.params, everything.batch.arrays, plans, everything.buckets)
    np.testing.assert_allclose(float(loss), float(everything.ref[0]), rtol=1e-5)
    # negative control: switch off the forwards of the last busy tick (the loss head's) and it must differ
    ops, recv, n_ticks, sig = everything.ex.tables(plans, everything.buckets)
    last = max(t for t in range(ops.shape[1]) if ops[:, t, :, T.F_ON].any())
    ops = ops.copy()
    ops[:, last, :, T.F_ON] = 0
    broken, _ = everything.ex.run_tables(everything.params, everything.batch.arrays, ops, recv, n_ticks, sig)
    assert abs(float(broken) - float(everything.ref[0])) > 1e-3
