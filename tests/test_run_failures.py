"""How a training run ends when something goes wrong, as real processes: signals, a full disk,
a diverging loss, a busy workdir, an incompatible config, a model too large for the host."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_cli

# the smallest run the CLI makes: one device, two microbatches, no audio, the reference step
SMALL = ["--config", "configs/tiny_cpu.py", "--config.pipeline.schedule=none", "--config.train.progress=false",
         "--config.mesh.data=1", "--config.mesh.pipe=1", "--config.data.microbatches=2", "--config.model.audio=none",
         "--config.train.steps=30", "--config.checkpoint.every=4"]


def _env(xla_cache):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    return {**env, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(xla_cache)}


def _losses(workdir):
    lines = [json.loads(l) for l in open(workdir / "metrics.jsonl") if l.strip()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def _last_line(text):
    return [l for l in text.splitlines() if l.strip()][-1]


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _train(workdir, xla_cache, *extra, preexec=None):
    return subprocess.run([sys.executable, "-m", "dip_jax.train", *SMALL, *extra, f"--workdir={workdir}"], cwd=ROOT,
                          env=_env(xla_cache), capture_output=True, text=True, timeout=600, preexec_fn=preexec)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, xla_cache):
    """An uninterrupted run, and one that is SIGTERMed, then runs out of disk at its next
    checkpoint, then resumes to the end, then is rerun finished."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    ref = _train(tmp / "ref", xla_cache)
    assert ref.returncode == 0, ref.stderr
    work = tmp / "run"
    out = {"ref": _losses(tmp / "ref"), "work": work}
    proc = subprocess.Popen([sys.executable, "-m", "dip_jax.train", *SMALL, f"--workdir={work}"], cwd=ROOT,
                            env=_env(xla_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((work / "metrics.jsonl").exists() and max(_losses(work), default=0) >= 2):
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    out["term"] = (proc.returncode, stderr, _steps(work))
    out["disk"] = _train(work, xla_cache, preexec=_limit_file_size), _steps(work)
    out["resume"] = _train(work, xla_cache)
    out["summary"] = (work / "summary.json").read_bytes()
    out["again"] = _train(work, xla_cache)
    return out


def test_sigterm_checkpoints_and_exits_143(lifecycle):
    code, stderr, steps = lifecycle["term"]
    line = _last_line(stderr)
    assert code == 128 + signal.SIGTERM, stderr
    assert line.startswith("dip_jax: interrupted at step ") and line.endswith(
        ", checkpoint saved, rerun the same command to resume"), stderr
    step = int(line.split("step ")[1].split(",")[0])
    assert 2 <= step < 30 and steps[-1] == step, (line, steps)
    assert "Traceback" not in stderr


def test_disk_full_stops_in_one_line_and_keeps_the_last_checkpoint(lifecycle):
    (res, steps), (_, _, before) = lifecycle["disk"], lifecycle["term"]
    assert res.returncode == 1, res.stderr
    line = _last_line(res.stderr)
    interrupted = before[-1]
    failed = (interrupted // 4 + 1) * 4
    assert line.startswith(f"dip_jax: checkpoint at step {failed} failed: file size limit exceeded on "), res.stderr
    assert f"checkpoint {interrupted} is intact" in line and "Traceback" not in res.stderr, res.stderr
    assert steps[-1] == interrupted


def test_resumed_run_equals_the_uninterrupted_one(lifecycle):
    res = lifecycle["resume"]
    assert res.returncode == 0, res.stderr
    got, ref = _losses(lifecycle["work"]), lifecycle["ref"]
    assert sorted(got) == sorted(ref) == list(range(1, 31))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-6)
    summary = json.loads(lifecycle["summary"])
    assert summary["resumed_from"] == lifecycle["term"][2][-1]
    assert summary["first_loss"] == ref[1] and summary["last_loss"] == ref[30]     # the whole run
    assert all("time" in json.loads(l) for l in open(lifecycle["work"] / "metrics.jsonl"))


def test_finished_run_rerun_changes_nothing(lifecycle):
    res = lifecycle["again"]
    assert res.returncode == 0, res.stderr
    assert "already at step 30 of 30" in res.stdout
    assert (lifecycle["work"] / "summary.json").read_bytes() == lifecycle["summary"]


def test_incompatible_config_is_refused_before_config_json_changes(lifecycle, xla_cache):
    work = lifecycle["work"]
    saved = (work / "config.json").read_bytes()
    res = _train(work, xla_cache, "--config.model.llm.dim=128", "--config.model.llm.heads=8")
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "model.llm.dim 64 -> 128" in lines[0] and "model.llm.heads" in lines[0]
    assert (work / "config.json").read_bytes() == saved
    ok = _train(work, xla_cache, "--config.optim.lr=0.001")              # compatible: the check passes
    assert ok.returncode == 0 and "already at step 30 of 30" in ok.stdout, ok.stderr
    assert json.loads((work / "config.json").read_text())["optim"]["lr"] == 0.001


@pytest.mark.parametrize("corruption", ["truncated array file", "deleted _METADATA", "missing data item"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(lifecycle, tmp_path, corruption, capsys):
    import shutil
    from dip_jax.data.pipeline import train_iterator
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    from dip_jax.train.checkpoint import Checkpointer
    from dip_jax.train.checkpoint_guard import CheckpointGuard
    from dip_jax.runtime.mesh import make_mesh
    from dip_jax.train.state import init_state, model_layouts
    work = tmp_path / "run"
    shutil.copytree(lifecycle["work"], work)
    newest, older = _steps(work)[-1], _steps(work)[-2]
    bad = work / "checkpoints" / str(newest)
    if corruption == "truncated array file":
        big = max((p for p in (bad / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with open(big, "r+b") as f:
            f.truncate(big.stat().st_size // 2)
    elif corruption == "deleted _METADATA":
        (bad / "state/_METADATA").unlink()
    else:
        shutil.rmtree(bad / "data")
    _, _, overrides, _ = parse_config_args(SMALL[2:])
    cfg = apply_overrides(load_config_file(ROOT / "configs/tiny_cpu.py"), overrides)
    _, state, _ = init_state(cfg)
    guard = CheckpointGuard(Checkpointer(work / "checkpoints", cfg.checkpoint, model_layouts(cfg), make_mesh(1, 1)))
    data = train_iterator(cfg)
    restored, step = guard.restore(state, data)
    guard.close()
    assert step == older
    line = _last_line(capsys.readouterr().out)
    assert line.startswith(f"dip_jax: skipped checkpoint {newest} (does not restore: ") and "moved to" in line
    assert (work / "checkpoints/corrupt" / str(newest)).is_dir() and not bad.exists()
    assert int(restored["step"]) == older


def test_nonfinite_loss_stops_the_run_and_never_checkpoints_nan(tmp_path, xla_cache, root):
    work = tmp_path / "nan"
    res = _train(work, xla_cache, "--config.optim.lr=1e6", "--config.checkpoint.every=1")
    assert res.returncode == 1, res.stderr
    line = _last_line(res.stderr)
    assert line.startswith("dip_jax: stopped: loss or gradient norm not finite at steps "), res.stderr
    records = [json.loads(l) for l in open(work / "metrics.jsonl")]
    bad = [r["step"] for r in records if "nan" in (r["loss"], r["grad_norm"]) or "inf" in (r["loss"], r["grad_norm"])]
    assert len(bad) == 3 and bad == list(range(bad[0], bad[0] + 3)), records
    assert f"step {bad[0]}: non-finite loss" in res.stdout
    assert max(_steps(work)) < bad[0]                          # no checkpoint of a non-finite step
    import jax
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    from dip_jax.train.checkpoint import Checkpointer
    from dip_jax.runtime.mesh import make_mesh
    from dip_jax.train.state import init_state, model_layouts
    from dip_jax.data.pipeline import train_iterator
    _, _, overrides, _ = parse_config_args(SMALL[2:])
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), overrides)
    ckpt = Checkpointer(work / "checkpoints", cfg.checkpoint, model_layouts(cfg), make_mesh(1, 1))
    state, step = ckpt.restore(init_state(cfg)[1], train_iterator(cfg))
    ckpt.close()
    assert step == max(_steps(work))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_second_run_on_a_busy_workdir_exits_at_once(tmp_path, xla_cache):
    import fcntl
    work = tmp_path / "busy"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, socket, sys, time\n"
        f"fd = os.open({str(work / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}@{socket.gethostname()}'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = _train(work, xla_cache)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 1, res.stderr
    line = _last_line(res.stderr)
    assert f"pid {holder.pid} on {socket.gethostname()}" in line and "in use by another run" in line, res.stderr
    assert not (work / "config.json").exists() and not (work / "metrics.jsonl").exists()


def test_model_too_large_for_the_host_is_refused_before_allocating(tmp_path):
    t0 = time.time()
    res = run_cli("dip_jax.train", "--config", "configs/vlm_s.py", f"--workdir={tmp_path / 'big'}", timeout=300)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "parameters + Adam state need ~" in lines[0] and "GB available" in lines[0]
    assert "python -m dip_jax.plan" in lines[0]
    assert time.time() - t0 < 120
