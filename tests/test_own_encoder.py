"""examples/own_encoder.py: a module type the library does not ship (a video encoder),
registered as a spec, composed with the library's llm and pipelined with DIP: the pipelined
loss and gradients equal the unpipelined model's, it trains from a user's loop, and the plan
CLI plans a config that uses it."""
import dataclasses
import importlib.util
import json
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, run_cli
from dip_jax import specs
from dip_jax.models.lmm import LMM

EXAMPLE = ROOT / "examples" / "own_encoder.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("own_encoder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(example):
    cfg = example.get_config(data=2, pipe=2)
    return cfg, example.make_samples(cfg, 120)


def test_registered_and_planned(example, setup):
    cfg, _ = setup
    assert specs.get("video").role == specs.ENCODER
    assert cfg.model.modules == ("video", "llm")
    _, ctx, _ = example.pipelined(cfg)
    video = next(m for m in ctx.partition.modules if m.name == "video")
    assert video.backward and sum(video.layers) == cfg.model.module("video").layers


def test_pipelined_equals_unpipelined(example, setup):
    cfg, samples = setup
    worst = example.check_equivalence(cfg, samples, steps=2)      # asserts rtol 1e-5 / atol 1e-6
    assert worst < 1e-4


def test_video_reaches_the_loss(example, setup):
    """The equivalence above could pass with the encoder cut off: its clips must change the loss
    and its parameters must get gradients."""
    cfg, samples = setup
    arrays, _ = next(example.batches(cfg, samples))
    assert arrays["video_clips"].shape[1] == cfg.model.module("video").max_clips
    assert (arrays["video_pos"] < cfg.data.seq_len).any()
    model = LMM(cfg.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p, a: nnx.merge(graphdef, p)(a)[0]
    blank = {**arrays, "video_clips": np.zeros_like(arrays["video_clips"])}
    assert abs(float(loss(params, arrays)) - float(loss(params, blank))) > 1e-4
    grads = jax.grad(loss)(params, arrays)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["video"]["blocks"]))


def test_trains_from_a_user_loop(example, setup):
    cfg, samples = setup
    losses = example.train(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2)), samples, steps=8)
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_plan_cli_plans_a_config_that_uses_it(tmp_path):
    res = run_cli("dip_jax.plan", "--config", str(EXAMPLE), "--metadata", str(EXAMPLE.with_suffix(".jsonl")),
                  "--batches", "2", "--rollouts", "4", "--schedulers", "dip,1f1b", "--out", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "DIP chunks video" in res.stdout
    report = json.loads((tmp_path / "plan_report.json").read_text())
    assert len(report["schedulers"]["dip"]["batches"]) == 2
    missing = run_cli("dip_jax.plan", "--config", str(EXAMPLE), "--batches", "1", timeout=300)
    assert missing.returncode == 2 and "--metadata: needed for module 'video'" in missing.stderr
