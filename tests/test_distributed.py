"""A real 2-process job on CPU (pipe=2, one pipe rank per process, loopback coordinator, gloo
collectives) trains the same losses as one process with pipe=2."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, free_port

OVERRIDES = ["--config.mesh.data=1", "--config.mesh.pipe=2", "--config.model.audio=none",
             "--config.data.microbatches=4", "--config.train.steps=3", "--config.train.progress=false",
             "--config.checkpoint.enabled=false", "--config.train.timeline_first=0",
             # process 0 plans; step 2's planner fails there, so process 1 must run process 0's fallback plan
             "--config.pipeline.plan_faults=((2, 'raise'),)"]


def _train_lines(path):
    return [r for r in map(json.loads, open(path)) if r["kind"] == "train"]


def test_two_processes_match_one(root, tmp_path, xla_cache):
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    from dip_jax.train.trainer import run

    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    cmd = [sys.executable, "-m", "dip_jax.train", "--config", "configs/tiny_cpu.py", *OVERRIDES,
           f"--workdir={tmp_path / 'two'}", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 devices {'data': 1, 'pipe': 2} in 2 process(es)" in outs[0]
    two = _train_lines(tmp_path / "two/metrics.jsonl")

    _, _, overrides, _ = parse_config_args(OVERRIDES)
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), overrides)
    run(cfg, tmp_path / "one")
    one = _train_lines(tmp_path / "one/metrics.jsonl")

    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["plan_fallback"] for r in two] == [False, True, False] == [r["plan_fallback"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)
