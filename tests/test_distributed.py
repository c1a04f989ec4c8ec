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


FILES = ["--config.mesh.data=2", "--config.mesh.pipe=1", "--config.model.audio=none", "--config.data.task=files",
         "--config.data.microbatches=4", "--config.data.seq_len=64", "--config.train.steps=3",
         "--config.train.progress=false", "--config.checkpoint.enabled=false", "--config.train.timeline_first=0",
         "--config.pipeline.plan_workers=0", "--config.data.log_records=true"]


def _two_processes(args, workdir, xla_cache, timeout=420):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dip_jax.train", "--config", "configs/tiny_cpu.py", *args,
           f"--config.pipeline.compile_cache_dir={xla_cache}", f"--workdir={workdir}",
           "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _decoded(workdir, process):
    """Per step, the (epoch, file:line) records one process decoded."""
    return {r["step"]: {tuple(x) for x in r["records"]}
            for r in map(json.loads, open(workdir / f"records_decoded/process_{process}.jsonl"))}


def test_two_replicas_on_two_processes_decode_disjoint_shares(root, tmp_path, xla_cache):
    """data=2 x pipe=1, one replica per process: each process decodes only its replica's
    records (disjoint, together the whole batch), and the losses are one process's with data=2.
    Without shares (the negative control) every process decodes the whole batch."""
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    from dip_jax.data.files.demo import TOKENIZER_DIR, write_dataset
    from dip_jax.train.trainer import run

    data = write_dataset(tmp_path / "d", train_records=60, eval_records=1) / "train.jsonl"
    args = [*FILES, f"--config.data.path={data}", f"--config.data.tokenizer={TOKENIZER_DIR}"]
    outs = _two_processes(args, tmp_path / "two", xla_cache)
    assert "2 devices {'data': 2, 'pipe': 1} in 2 process(es)" in outs[0]
    two = _train_lines(tmp_path / "two/metrics.jsonl")
    shares = [_decoded(tmp_path / "two", i) for i in range(2)]

    _, _, overrides, _ = parse_config_args(args)
    cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), overrides)
    run(cfg, tmp_path / "one")
    one = _train_lines(tmp_path / "one/metrics.jsonl")
    whole = _decoded(tmp_path / "one", 0)

    assert [r["step"] for r in two] == [1, 2, 3] == sorted(whole)
    for step, batch in whole.items():
        assert shares[0][step] and shares[1][step]
        assert not shares[0][step] & shares[1][step], step
        assert shares[0][step] | shares[1][step] == batch, step
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    per = [sum(map(len, s.values())) for s in shares]
    assert summary["records_decoded_per_process"] == per and summary["records_decoded"] == sum(map(len, whole.values()))
    assert summary["records_skipped"] == json.loads((tmp_path / "one/summary.json").read_text())["records_skipped"]

    _two_processes([*args, "--config.train.steps=1", "--config.data.decode_shares=false"], tmp_path / "all", xla_cache)
    everything = [_decoded(tmp_path / "all", i) for i in range(2)]
    assert everything[0][1] == everything[1][1] == whole[1]
