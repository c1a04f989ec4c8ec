import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, run_cli
from dip_jax.data.pipeline import PackedBatches
from dip_jax.config.overrides import apply_overrides, load_config_file
from dip_jax.runtime.mesh import make_mesh
from dip_jax.train.state import init_state
from dip_jax.train.step import loss_fn, put_batch


def _losses(path):
    lines = [json.loads(l) for l in open(path) if l.strip()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def test_data_parallel_reference_equals_single_device(root):
    """The reference step shards microbatches over all 8 devices; same loss and grads as 1 device."""
    cfg = load_config_file(root / "configs/tiny_cpu.py")
    graphdef, state, _ = init_state(cfg)
    arrays = PackedBatches(cfg)(3).arrays
    vg = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, b)[0]))
    one = vg(state["params"], {k: jax.numpy.asarray(v) for k, v in arrays.items()})
    mesh = make_mesh(2, 4)
    sharded = vg(jax.device_put(state["params"], jax.sharding.NamedSharding(mesh, jax.P())),
                 put_batch(arrays, mesh))
    np.testing.assert_allclose(float(sharded[0]), float(one[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(one[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # negative control: a different batch gives a different loss
    other = vg(state["params"], {k: jax.numpy.asarray(v) for k, v in PackedBatches(cfg)(4).arrays.items()})
    assert abs(float(other[0]) - float(one[0])) > 1e-4


def test_tiny_training_loss_falls(root, tmp_path):
    from dip_jax.train.trainer import run
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                          ["train.steps=30", "train.progress=false", "checkpoint.enabled=false"])
    summary = run(cfg, tmp_path)
    losses = list(_losses(tmp_path / "metrics.jsonl").values())
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert json.loads((tmp_path / "summary.json").read_text())["last_loss"] == summary["last_loss"]


FAST = ["--config", "configs/tiny_cpu.py", "--config.train.steps=14", "--config.checkpoint.every=4",
        "--config.train.progress=false"]


def _wait_for_step(path, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()}")
        if path.exists() and any(s >= step for s in _losses(path)):
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_kill_9_and_resume_reproduces_uninterrupted_losses(tmp_path, xla_cache):
    """Under the shipped dip scheduler (plans are recomputed on resume, deterministically)."""
    args = [*FAST, f"--config.pipeline.compile_cache_dir={xla_cache}"]
    ref = run_cli("dip_jax.train", *args, f"--workdir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    expected = _losses(tmp_path / "ref/metrics.jsonl")

    work = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    proc = subprocess.Popen([sys.executable, "-m", "dip_jax.train", *args, f"--workdir={work}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(work / "metrics.jsonl", 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("dip_jax.train", *args, f"--workdir={work}")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((work / "summary.json").read_text())
    assert 4 <= summary["resumed_from"] <= 12, summary
    got = _losses(work / "metrics.jsonl")
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
    assert json.loads(open(work / "metrics.jsonl").readline())["scheduler"] == "dip"


def test_frozen_module_and_zero_multiplier_leave_params_unchanged(root):
    from dip_jax.train.step import make_train_step
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                          ["optim.frozen=('vision',)", "optim.lr_multipliers=(('audio', 0.0),)",
                           "optim.warmup_steps=0", "optim.schedule=constant"])
    graphdef, state, tx = init_state(cfg)
    before = jax.tree.map(np.asarray, state["params"])
    step = make_train_step(graphdef, tx)
    arrays = {k: jax.numpy.asarray(v) for k, v in PackedBatches(cfg)(0).arrays.items()}
    state, metrics = step(state, arrays)
    after = state["params"]
    changed = lambda m: any(not np.array_equal(a, b) for a, b in
                            zip(jax.tree.leaves(before[m]), jax.tree.leaves(after[m])))
    assert not changed("vision") and not changed("audio")
    assert changed("llm")
    assert float(metrics["grad_norm"]) > 0


SCHEDULES = ("none", "dip", "1f1b", "interleaved_1f1b", "gpipe", "encoders_first")


def _tiny(root, xla_cache, *overrides):
    return apply_overrides(load_config_file(root / "configs/tiny_cpu.py"),
                           ["train.progress=false", f"pipeline.compile_cache_dir={xla_cache}", *overrides])


def _records(workdir, kind="train"):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["kind"] == kind]


@pytest.fixture(scope="module")
def scheduler_runs(root, tmp_path_factory, xla_cache):
    """5 steps of tiny_cpu (pipe=4) under every scheduler, same seed and data."""
    from dip_jax.train.trainer import run
    tmp = tmp_path_factory.mktemp("schedulers")
    out = {}
    for sched in SCHEDULES:
        evaluate = ["train.eval_every=5", "data.eval_samples=40"] if sched in ("none", "dip") else []
        cfg = _tiny(root, xla_cache, "train.steps=5", "checkpoint.every=4", f"pipeline.schedule={sched}", *evaluate)
        out[sched] = (run(cfg, tmp / sched), _records(tmp / sched), tmp / sched)
    return out


def test_schedulers_log_the_same_losses(scheduler_runs):
    reference = [r["loss"] for r in scheduler_runs["none"][1]]
    assert len(reference) == 5 and all(r["scheduler"] is None for r in scheduler_runs["none"][1])
    for sched in SCHEDULES[1:]:
        summary, records, _ = scheduler_runs[sched]
        np.testing.assert_allclose([r["loss"] for r in records], reference, rtol=1e-4, err_msg=sched)
        for r in records:
            assert r["scheduler"] == sched and r["plan_fallback"] is False and r["compiles"] >= 1
            assert 0.0 <= r["bubble_fraction"] < 1.0 and r["predicted_step_seconds"] >= r["lower_bound_seconds"]
        assert summary["plan_fallbacks"] == 0 and summary["planned_steps"] == 5
        assert 0.0 <= summary["plan_wait_fraction"] < 1.0


def test_eval_through_the_executor_equals_the_reference(scheduler_runs):
    (ref,), (dip,) = _records(scheduler_runs["none"][2], "eval"), _records(scheduler_runs["dip"][2], "eval")
    assert ref["step"] == dip["step"] == 5
    np.testing.assert_allclose(dip["eval_loss"], ref["eval_loss"], rtol=1e-5)
    assert scheduler_runs["dip"][0]["eval_loss"] == dip["eval_loss"]


def test_timelines_and_summary(scheduler_runs):
    summary, records, workdir = scheduler_runs["dip"]
    files = sorted(p.name for p in (workdir / "timelines").iterdir())
    assert files == ["step_1.png", "step_1.trace.json", "step_2.png", "step_2.trace.json"]
    trace = json.loads((workdir / "timelines/step_1.trace.json").read_text())
    ops = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["cat"] for e in ops} == {"vision", "audio", "llm"} and {e["tid"] for e in ops} == {0, 1, 2, 3}
    assert "measured" in trace["traceEvents"][0]["args"]["name"]
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["compiles"] == records[-1]["compiles"] and on_disk["last_loss"] == records[-1]["loss"]
    assert on_disk["plan_wait_seconds"] == pytest.approx(sum(r["plan_wait_seconds"] for r in records))


def test_planner_failures_fall_back_and_training_continues(root, tmp_path, xla_cache, scheduler_runs):
    """Step 2's planner raises, step 3's misses its deadline: both run interleaved 1F1B."""
    from dip_jax.train.trainer import run
    cfg = _tiny(root, xla_cache, "train.steps=4", "checkpoint.enabled=false", "pipeline.plan_deadline_seconds=6",
                "pipeline.plan_faults=((2, 'raise'), (3, 'late'))")
    t0 = time.perf_counter()
    summary = run(cfg, tmp_path / "run")
    records = _records(tmp_path / "run")
    assert [r["plan_fallback"] for r in records] == [False, True, True, False]
    assert [r["scheduler"] for r in records] == ["dip", "interleaved_1f1b", "interleaved_1f1b", "dip"]
    assert records[1]["plan_fallback_reason"] == "error: RuntimeError: planner fault injected at step 2"
    assert records[2]["plan_fallback_reason"].startswith("deadline: no dip plan after 6 s")
    assert 6.0 <= records[2]["plan_wait_seconds"] < 12.0       # waited for the deadline, not for the search
    assert summary["plan_fallbacks"] == 2
    reference = [r["loss"] for r in scheduler_runs["none"][1]][:4]
    np.testing.assert_allclose([r["loss"] for r in records], reference, rtol=1e-4)
    assert time.perf_counter() - t0 < 600


def test_resume_under_another_scheduler_and_pipe_size(root, tmp_path, xla_cache, scheduler_runs):
    """The 1f1b run (data=2 x pipe=4) checkpointed step 4; resume it under dip on data=4 x pipe=2."""
    from dip_jax.train.trainer import run
    import shutil
    work = tmp_path / "resumed"
    shutil.copytree(scheduler_runs["1f1b"][2], work)
    for step in (5,):                                    # keep only the step-4 checkpoint
        shutil.rmtree(work / "checkpoints" / str(step), ignore_errors=True)
    cfg = _tiny(root, xla_cache, "train.steps=6", "pipeline.schedule=dip", "mesh.data=4", "mesh.pipe=2")
    summary = run(cfg, work)
    assert summary["resumed_from"] == 4
    records = _records(work)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["batch_index"] for r in records] == list(range(6))      # no prefetched batch skipped
    assert [r["scheduler"] for r in records] == ["1f1b"] * 4 + ["dip"] * 2
    reference = [r["loss"] for r in scheduler_runs["none"][1]]
    np.testing.assert_allclose(records[4]["loss"], reference[4], rtol=1e-4)
    assert np.isfinite(records[5]["loss"])


def test_checkpoint_restores_into_any_layout(root, xla_cache, scheduler_runs):
    """The 1f1b run's step-4 checkpoint (stage layout, data=2 x pipe=4) read into the model layout,
    into its own layout and into data=4 x pipe=2's: the same parameters and optimizer state."""
    from dip_jax.data.pipeline import train_iterator
    from dip_jax.plan.schedulers import PlanContext
    from dip_jax.runtime.stages import StageLayout, relayout
    from dip_jax.train.checkpoint import Checkpointer
    from dip_jax.train.optim import build_optimizer
    from dip_jax.train.state import create_state, model_layouts

    def restored(data, pipe, staged):
        cfg = _tiny(root, xla_cache, "train.steps=5", f"mesh.data={data}", f"mesh.pipe={pipe}")
        layouts = ({m.name: StageLayout(pipe, m.chunks // pipe, m.layers) for m in PlanContext(cfg).partition.modules}
                   if staged else model_layouts(cfg))
        mesh = make_mesh(data, pipe)
        tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
        ckpt = Checkpointer(scheduler_runs["1f1b"][2] / "checkpoints", cfg.checkpoint, layouts, mesh)
        state, step = ckpt.restore(create_state(cfg, tx, mesh, layouts), train_iterator(cfg))
        ckpt.close()
        assert step == 5
        tree = {"params": state["params"], "opt_state": state["opt_state"]}
        return jax.tree.map(np.asarray, relayout(tree, layouts, model_layouts(cfg)))

    model = restored(2, 4, staged=False)
    for other in (restored(2, 4, staged=True), restored(4, 2, staged=True)):
        leaves = jax.tree_util.tree_flatten_with_path(other)[0]
        assert len(leaves) == len(jax.tree.leaves(model))
        for (path, a), b in zip(leaves, jax.tree.leaves(model)):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # negative control: the untrained initial state differs from the checkpoint's
    cfg = _tiny(root, xla_cache, "train.steps=5")
    fresh = create_state(cfg, build_optimizer(cfg.optim, 5, cfg.model.modules), make_mesh(2, 4), model_layouts(cfg))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh["params"]),
                                                        jax.tree.leaves(model["params"])))


def test_resume_from_a_pipelined_checkpoint_under_the_reference_step(root, tmp_path, xla_cache, scheduler_runs):
    """1f1b's step-4 checkpoint (stage layout) resumes under schedule=none (model layout) and
    continues as the reference run does."""
    from dip_jax.train.trainer import run
    import shutil
    work = tmp_path / "to_none"
    shutil.copytree(scheduler_runs["1f1b"][2], work)
    shutil.rmtree(work / "checkpoints" / "5", ignore_errors=True)
    summary = run(_tiny(root, xla_cache, "train.steps=5", "pipeline.schedule=none"), work)
    assert summary["resumed_from"] == 4 and summary["state_bytes_per_device_max"] == summary["state_bytes_total"]
    records = _records(work)
    assert [r["scheduler"] for r in records] == ["1f1b"] * 4 + [None]
    reference = [r["loss"] for r in scheduler_runs["none"][1]]
    np.testing.assert_allclose(records[4]["loss"], reference[4], rtol=1e-4)
    assert abs(records[4]["loss"] - records[3]["loss"]) > 1e-3       # a trained step, not a repeat
