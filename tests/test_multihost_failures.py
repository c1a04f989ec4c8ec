"""A two-process job that is preempted and loses processes, as real processes (tiny model,
pipe=2, one pipe rank per process, gloo over loopback): a signal to any one process stops both
at the same step with one checkpoint; a killed process, the coordinator included, ends the other
within a minute in one line; every rerun resumes, and the losses equal an uninterrupted run's.
Also: a run whose every update overflows stops instead of training nothing."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, free_port

STEPS = 14
TWO = ["--config", "configs/tiny_cpu.py", "--config.mesh.data=1", "--config.mesh.pipe=2", "--config.model.audio=none",
       "--config.data.microbatches=4", f"--config.train.steps={STEPS}", "--config.train.progress=false",
       "--config.checkpoint.every=2", "--config.train.timeline_first=0", "--config.train.timeline_every=0",
       "--config.distributed.timeout_seconds=30"]


def _env(xla_cache):
    return {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "JAX_COMPILATION_CACHE_DIR": str(xla_cache)}


def _losses(workdir) -> dict[int, list[float]]:
    """Every logged loss of each step (a step trained again after a resume is logged again)."""
    out: dict[int, list[float]] = {}
    for line in open(workdir / "metrics.jsonl"):
        try:
            r = json.loads(line)
        except ValueError:
            continue                                   # cut short when its process was killed
        if r["kind"] == "train":
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


class Job:
    """Both processes of one launch; `event(kind, process, at_step)` signals or kills one (or
    "all") once process 0 has logged `at_step`, then waits for both to end."""

    def __init__(self, workdir, xla_cache):
        self.workdir = workdir
        cmd = [sys.executable, "-m", "dip_jax.train", *TWO, f"--workdir={workdir}", "--coordinator",
               f"127.0.0.1:{free_port()}", "--num-processes", "2"]
        self.procs = [subprocess.Popen([*cmd, "--process-id", str(i)], cwd=ROOT, env=_env(xla_cache),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]

    def wait(self, timeout=400):
        t0 = time.time()
        out = []
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                err += "\n<still running: killed by the test>"
            out.append((p.returncode, time.time() - t0, [l for l in err.splitlines() if l.strip()]))
        return out

    def event(self, sig, who, at_step):
        t0 = time.time()
        while max((self.workdir / "metrics.jsonl").exists() and _losses(self.workdir) or [0]) < at_step:
            assert all(p.poll() is None for p in self.procs) and time.time() - t0 < 300, "the run ended early"
            time.sleep(0.05)
        for i in ((0, 1) if who == "all" else (who,)):
            self.procs[i].send_signal(sig)
        return self.wait(timeout=120)


@pytest.fixture(scope="module")
def job(tmp_path_factory, xla_cache):
    tmp = tmp_path_factory.mktemp("multihost")
    ref = Job(tmp / "ref", xla_cache).wait()
    assert all(code == 0 for code, _, _ in ref), ref
    work = tmp / "run"
    out = {"ref": _losses(tmp / "ref"), "work": work, "phases": []}
    # (what happens, to which process, at which step); each launch resumes the one before
    for sig, who, at in [(signal.SIGTERM, 1, 2), (signal.SIGTERM, 0, 5), (signal.SIGKILL, 1, 8),
                         (signal.SIGKILL, 0, 11)]:
        before = _steps(work) if (work / "checkpoints").exists() else []
        ends = Job(work, xla_cache).event(sig, who, at)
        out["phases"].append((sig, who, before, ends, _steps(work)))
    out["last"] = Job(work, xla_cache).wait()
    return out


def _check_interrupted(phase, signalled):
    sig, who, before, ends, after = phase
    lines = set()
    for code, seconds, err in ends:
        assert code == 128 + signal.SIGTERM and seconds < 60, (code, seconds, err)
        assert len(err) <= 3 and not any("Traceback" in l for l in err), err
        lines.add(err[-1])
    assert len(lines) == 1, lines                     # both stopped after the same step
    line = lines.pop()
    assert line.startswith("dip_jax: interrupted at step ") and line.endswith(
        f" (signal on process {signalled}), checkpoint saved, rerun the same command on every process to resume"), line
    step = int(line.split("step ")[1].split(" ")[0])
    # one checkpoint at that step, beside the regular ones (checkpoint.every=2)
    assert after[-1] == step and all(s % 2 == 0 for s in set(after) - set(before) - {step}), (before, after, step)


def test_sigterm_to_process_1_stops_both_with_one_checkpoint(job):
    _check_interrupted(job["phases"][0], 1)


def test_sigterm_to_process_0_stops_both_with_one_checkpoint(job):
    _check_interrupted(job["phases"][1], 0)


@pytest.mark.parametrize("phase,lost", [(2, 1), (3, 0)], ids=["kill-process-1", "kill-process-0"])
def test_a_killed_process_ends_the_other_in_one_line(job, phase, lost):
    sig, who, before, ends, after = job["phases"][phase]
    code, seconds, err = ends[1 - lost]
    assert code not in (0, 134, 139, -6, -11) and code == 1 and seconds < 60, (code, seconds, err)
    assert len(err) <= 3 and not any("Traceback" in l or "@ 0x" in l or "stack trace" in l for l in err), err
    line = err[-1]
    assert line.startswith(f"dip_jax: lost process {lost}"), line
    assert f"the last complete checkpoint is step {after[-1]} in " in line, (line, after)
    assert line.endswith("rerun the same command on every process to resume"), line


def test_every_rerun_resumes_and_the_losses_equal_an_uninterrupted_run(job):
    assert all(code == 0 for code, _, _ in job["last"]), job["last"]
    got, ref = _losses(job["work"]), job["ref"]
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step, losses in got.items():                  # steps trained again after a kill, too
        np.testing.assert_allclose(losses, ref[step] * len(losses), rtol=1e-6, err_msg=f"step {step}")


def test_every_update_overflowing_stops_the_run(tmp_path, xla_cache):
    """lr=1e30: the loss and gradients stay finite, every update overflows and is skipped on the
    device; the host hears of it and stops, with no checkpoint after the first skipped step."""
    env = {k: v for k, v in _env(xla_cache).items() if k != "JAX_NUM_CPU_DEVICES"}
    res = subprocess.run([sys.executable, "-m", "dip_jax.train", "--config", "configs/tiny_cpu.py",
                          "--config.pipeline.schedule=none", "--config.mesh.data=1", "--config.mesh.pipe=1",
                          "--config.data.microbatches=2", "--config.model.audio=none", "--config.train.progress=false",
                          "--config.optim.lr=1e30", "--config.train.steps=30", "--config.checkpoint.every=1",
                          f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "non-finite update" in res.stdout and "stopped: update not finite at steps " in res.stderr, res.stderr
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    skipped = [r["step"] for r in lines if r["update_skipped"]]
    assert skipped and all(r["update_skipped"] for r in lines if r["step"] >= skipped[0])
    assert max(_steps(tmp_path)) < skipped[0], (_steps(tmp_path), skipped)
