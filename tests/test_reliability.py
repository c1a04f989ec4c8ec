"""Reliability pieces that need no training run: the non-finite guard, interrupts, config
compatibility, the memory preflight, over-long samples, strict metadata, overrides, plans as JSON."""
import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from dip_jax.config import ConfigError
from dip_jax.config.overrides import apply_overrides, load_config_file


@pytest.fixture
def tiny(root):
    return load_config_file(root / "configs/tiny_cpu.py")


def test_nonfinite_gradients_leave_params_and_optimizer_state_unchanged():
    import jax.numpy as jnp
    import optax
    from dip_jax.train.nonfinite import skip_nonfinite
    tx = skip_nonfinite(optax.adam(0.1))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    good, s1 = tx.update({"w": jnp.full(3, 0.5)}, state, params)
    assert np.all(np.asarray(good["w"]) != 0) and int(s1[0].count) == 1
    for bad in (jnp.array([1.0, jnp.nan, 0.0]), jnp.array([jnp.inf, 0.0, 0.0])):
        upd, s2 = tx.update({"w": bad}, s1, params)
        assert np.all(np.asarray(upd["w"]) == 0)
        assert int(s2[0].count) == 1 and np.array_equal(np.asarray(s2[0].mu["w"]), np.asarray(s1[0].mu["w"]))


def test_nonfinite_monitor_stops_after_the_configured_streak(tiny, capsys):
    from dip_jax.train.errors import RunStopped
    from dip_jax.train.nonfinite import NonfiniteMonitor
    mon = NonfiniteMonitor(apply_overrides(tiny, ["train.max_nonfinite_steps=2"]).train)
    assert mon.observe(1, {"loss": 1.0, "grad_norm": 1.0})
    assert not mon.observe(2, {"loss": float("nan"), "grad_norm": 1.0})
    mon.check_stop(1)
    assert mon.observe(3, {"loss": 1.0, "grad_norm": 1.0})            # a finite step resets the streak
    assert not mon.observe(4, {"loss": 1.0, "grad_norm": float("inf")})
    mon.check_stop(3)
    assert not mon.observe(5, {"loss": float("nan"), "grad_norm": float("nan")})
    with pytest.raises(RunStopped, match=r"steps 4-5 \(2 in a row") as e:
        mon.check_stop(3)
    assert e.value.exit_code == 1 and "checkpoint (step 3)" in str(e.value)
    assert "step 4: non-finite loss 1 / grad_norm inf, update skipped" in capsys.readouterr().out
    skip = NonfiniteMonitor(apply_overrides(tiny, ["train.on_nonfinite=skip", "train.max_nonfinite_steps=1"]).train)
    assert not skip.observe(1, {"loss": float("nan"), "grad_norm": 1.0})
    skip.check_stop(None)                                              # "skip" never stops


def test_metrics_write_nonfinite_as_strings_and_a_timestamp(tmp_path):
    from dip_jax.train.metrics import MetricsWriter
    log = MetricsWriter(tmp_path, 3, progress=False)
    log.write("train", 1, loss=float("nan"), grad_norm=float("inf"), x=float("-inf"), y=None, z=1.5)
    log.close()
    r = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (r["loss"], r["grad_norm"], r["x"], r["y"], r["z"]) == ("nan", "inf", "-inf", None, 1.5)
    assert r["time"] > 1.5e9


def test_second_signal_exits_at_once_first_only_asks():
    code = ("import os, signal, time\n"
            "from dip_jax.train.interrupt import Interrupts\n"
            "with Interrupts() as i:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
            "    print('asked', i.requested, i.exit_code, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "    print('not reached', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "asked True 130" and res.returncode == 130, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr


def test_config_compatibility_names_the_changed_keys(tiny):
    from dip_jax.train.workdir import config_dict, incompatible_keys
    old = config_dict(tiny)
    same = ["optim.lr=1e-4", "mesh.pipe=2", "mesh.data=4", "train.steps=80", "pipeline.schedule=1f1b",
            "data.seed=3", "optim.lr_multipliers=(('vision', 0.5),)", "model.name=x", "checkpoint.every=5"]
    assert incompatible_keys(old, config_dict(apply_overrides(tiny, same))) == []
    assert incompatible_keys(old, config_dict(apply_overrides(tiny, ["model.llm.dim=128", "model.llm.heads=8"]))) \
        == ["model.llm.dim", "model.llm.heads"]
    assert incompatible_keys(old, config_dict(apply_overrides(tiny, ["model.audio=none"]))) == ["model.audio"]
    assert incompatible_keys(old, config_dict(apply_overrides(tiny, ["optim.frozen=('vision',)"]))) == ["optim.frozen"]
    assert incompatible_keys(old, config_dict(apply_overrides(tiny, ["optim.grad_clip=0"]))) == ["optim.grad_clip"]


class _Device:
    def __init__(self, platform, limit=None):
        self.platform, self.device_kind, self.limit = platform, "FakeGPU", limit

    def memory_stats(self):
        return {"bytes_limit": self.limit}


def test_memory_preflight(root, tiny, monkeypatch):
    from dip_jax.train import preflight
    big = load_config_file(root / "configs/vlm_s.py")
    per = preflight.state_bytes_per_device(big)
    total = big.model.param_count()
    # blocks split over pipe x tensor (vlm_s: 4 x 4), the rest replicated
    assert 16 * total / (big.mesh.pipe * big.mesh.tensor) < per < 16 * total / big.mesh.pipe
    monkeypatch.setattr(preflight, "host_memory_bytes", lambda: 64e9)
    with pytest.raises(ConfigError, match=r"need ~32 GB per device .* x 4 CPU devices = 128 GB, but the host has 64 GB"):
        preflight.check_state_fits(big, [_Device("cpu")] * 4)
    preflight.check_state_fits(tiny, [_Device("cpu")] * 8)
    with pytest.raises(ConfigError, match="a FakeGPU has 24 GB"):
        preflight.check_state_fits(big, [_Device("gpu", 24e9)])
    preflight.check_state_fits(big, [_Device("gpu", 141e9)])
    assert preflight.host_memory_bytes() is not None


def test_overrides_do_not_depend_on_their_order(tiny):
    order = ["mesh.data=1", "mesh.pipe=8", "model.vision.layers=8", "model.audio.layers=8", "model.llm.layers=8"]
    a, b = apply_overrides(tiny, order), apply_overrides(tiny, order[::-1])
    assert a == b and a.mesh.pipe == 8
    with pytest.raises(ConfigError, match="model.vision.layers"):        # the final config is still checked
        apply_overrides(tiny, ["mesh.data=1", "mesh.pipe=8"])


def test_cli_small_errors_and_help(capsys):
    from dip_jax.train.__main__ import main
    assert main(["--config", "README.md"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l]
    assert len(err) == 1 and "README.md is not a Python config file" in err[0]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--config.train.on_nonfinite='stop'" in out and "--config.data.oversize='truncate'" in out
    assert "[checkpoint]" in out and "--config.checkpoint.every=20" in out


def test_mesh_rule_for_microbatches_names_the_unpipelined_step(tiny):
    from dip_jax.runtime.mesh import check_devices
    check_devices(apply_overrides(tiny, ["mesh.pipe=3"]), 8)            # pipelined: split over data replicas only
    with pytest.raises(ConfigError, match=r"data.microbatches: 8 microbatches cannot be split over the 6 devices "
                                          r"of mesh data=2 x pipe=3 \(pipeline.schedule=none shards"):
        check_devices(apply_overrides(tiny, ["mesh.pipe=3", "pipeline.schedule=none"]), 8)


# -- over-long samples and metadata ---------------------------------------------------------------

def _budget(tiny):
    from dip_jax.data.packing import Budget
    return Budget.from_config(tiny)


def test_oversize_metadata_policies(tiny):
    from dip_jax.data.metadata import SampleMeta
    from dip_jax.data.oversize import fit_metas
    b = _budget(tiny)                            # 128 tokens, 8 images of 4 tokens, 4 audio clips of 8
    long = [SampleMeta(text_tokens=20), SampleMeta(text_tokens=100, images=24), SampleMeta(text_tokens=500),
            SampleMeta(text_tokens=10, audio_seconds=9.0)]
    out, counts = fit_metas(long, b, "truncate")
    assert (counts.truncated, counts.skipped) == (3, 0) and out[0] == long[0]
    assert out[1] == SampleMeta(text_tokens=96, images=8) and out[2] == SampleMeta(text_tokens=128)
    assert out[3] == SampleMeta(text_tokens=10, audio_seconds=4.0)
    assert all(b.fits_alone(m) for m in out)
    out, counts = fit_metas(long, b, "skip")
    assert out == [long[0]] and (counts.truncated, counts.skipped) == (0, 3)
    with pytest.raises(ValueError, match=r"sample 1 .* does not fit one microbatch .* data.oversize"):
        fit_metas(long, b, "error")


def test_truncated_sample_content_matches_its_metadata(tiny):
    from dip_jax.data.metadata import BOS, EOS, IMG, Sample, SampleMeta
    from dip_jax.data.oversize import fit_sample
    b = _budget(tiny)
    tokens = np.array([BOS] + [IMG] * 4 * 10 + [40] * 100 + [EOS], np.int32)
    s = Sample(tokens, np.ones(len(tokens), bool), SampleMeta(text_tokens=102, images=10), 7,
               images=np.zeros((10, 16, 16, 3), np.float32))
    t = fit_sample(s, b, "truncate")
    assert len(t.tokens) == 128 and t.meta.images == 8 and t.images.shape[0] == 8 and t.meta.text_tokens == 96
    assert t.meta.text_tokens + 8 * b.tokens_per_image == len(t.tokens) and b.fits_alone(t.meta)
    assert int((t.tokens == IMG).sum()) == 8 * b.tokens_per_image
    assert fit_sample(s, b, "skip") is None


@pytest.mark.parametrize("line, key", [
    ('{"text_tokens": -3}', "text_tokens"), ('{"images": 2.5}', "images"), ('{"images": "3"}', "images"),
    ('{"text_tokens": NaN}', "text_tokens"), ('{"audio_seconds": Infinity}', "audio_seconds"),
    ('{"video_seconds": -1.0}', "video_seconds"), ('{"images": true}', "images"), ('{"pictures": 1}', "pictures"),
])
def test_bad_metadata_names_file_line_and_key(tmp_path, line, key):
    from dip_jax.data.metadata import read_metadata_jsonl
    path = tmp_path / "m.jsonl"
    path.write_text('{"text_tokens": 5, "images": 1, "audio_seconds": 1.5}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"m.jsonl:2: .*'{key}'"):
        list(read_metadata_jsonl(path))


@pytest.mark.parametrize("flag", ["--batches=0", "--rollouts=0", "--budget=0", "--workers=0"])
def test_plan_cli_rejects_empty_budgets(root, flag, capsys):
    from dip_jax.plan.__main__ import main
    assert main(["--config", str(root / "configs/tiny_cpu.py"), flag]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l]
    assert len(err) == 1 and flag.split("=")[0] in err[0]


def _realistic_trace(path, n=12000):
    """Caption pairs, heavy-tailed interleaved documents and plain text, with over-long samples."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        k = rng.random()
        if k < 0.5:
            rows.append({"text_tokens": int(rng.poisson(16)) + 2, "images": 1})
        elif k < 0.85:
            m = int(min(24, rng.geometric(0.3)))
            rows.append({"text_tokens": int(np.clip(rng.lognormal(np.log(24), 1.2, m), 1, 3115).sum()) + 2,
                         "images": m})
        else:
            rows.append({"text_tokens": int(rng.integers(50, 2000))})
    rows[777] = {"text_tokens": 4319, "images": 24}          # 24 x 256 image tokens + text > 8192
    rows[5000] = {"text_tokens": 9000}
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    return rows


def test_plan_cli_on_a_real_trace_with_over_long_samples(root, tmp_path):
    from dip_jax.data.metadata import SampleMeta
    from dip_jax.data.packing import Budget
    cfg = load_config_file(root / "configs/vlm_s.py")
    rows = _realistic_trace(tmp_path / "trace.jsonl")
    expected = sum(not Budget.from_config(cfg).fits_alone(SampleMeta(**r)) for r in rows)
    assert expected >= 2
    cmd = [sys.executable, "-m", "dip_jax.plan", "--config", "configs/vlm_s.py", "--metadata", str(tmp_path / "trace.jsonl"),
           "--batches", "2", "--rollouts", "1", "--schedulers", "dip,1f1b", "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "o/plan_report.json").read_text())
    assert (report["samples_truncated"], report["samples_skipped"], report["oversize"]) == (expected, 0, "truncate")
    assert len(report["schedulers"]["dip"]["batches"]) == 2
    assert f"warning: {expected} samples truncated and 0 skipped" in res.stderr
    err = subprocess.run(cmd + ["--config.data.oversize=error"], cwd=root, capture_output=True, text=True, timeout=300)
    lines = [l for l in err.stderr.splitlines() if l.strip()]
    assert err.returncode == 2 and len(lines) == 1 and "sample 777" in lines[0], err.stderr


# -- plans across processes ----------------------------------------------------------------------

def test_batch_plans_round_trip_through_json(tiny):
    from dip_jax.data.pipeline import PackedBatches
    from dip_jax.plan.schedulers import PlanContext
    from dip_jax.train.planning import BatchPlan, plan_batch
    ctx = PlanContext(apply_overrides(tiny, ["pipeline.search_rollouts=1"]))
    order, replicas = plan_batch(ctx, 1, PackedBatches(tiny, content=False).metadata(0), "dip")
    plan = BatchPlan(1, "dip", replicas, order, None, 0.25)
    again = BatchPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.plans == plan.plans and again.order == plan.order and again.fields() == plan.fields()
    assert again.slowest.timeline.start == plan.slowest.timeline.start


def test_no_pickle_where_data_comes_from_other_processes():
    hits = [f"{p.relative_to(ROOT)}:{n}" for d in ("runtime", "train") for p in (ROOT / "dip_jax" / d).glob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if "pickle" in line]
    assert hits == []
