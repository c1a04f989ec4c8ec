"""A pretrained backbone trained pipelined: `model.llm.init_from` on configs/tiny_cpu.py (a Qwen2
checkpoint shaped like its llm: q/k/v biases split over 'tensor') under DIP on data=1 x pipe=2 x
tensor=2 starts at the unpipelined reference's loss from the same checkpoint; the run's export
loads in transformers and gives the forward checker's logits, which differ from the
checkpoint's (it trained)."""
import json

import numpy as np
import pytest
import torch
import transformers

from conftest import run_cli
from dip_jax.hf import __main__ as cli

LLM = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def pretrained_runs(root, tmp_path_factory, xla_cache):
    from dip_jax.config.overrides import apply_overrides, load_config_file
    from dip_jax.train.trainer import run
    tmp = tmp_path_factory.mktemp("hf_train")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLM)).eval()
    model.save_pretrained(tmp / "qwen", max_shard_size="200KB")
    out = {"dir": tmp / "qwen", "model": model}
    for sched in ("dip", "none"):
        cfg = apply_overrides(load_config_file(root / "configs/tiny_cpu.py"), [
            f"model.llm.init_from={tmp / 'qwen'}", "train.progress=false", f"pipeline.compile_cache_dir={xla_cache}",
            "train.steps=3", "checkpoint.every=3", "mesh.data=1", "mesh.pipe=2", "mesh.tensor=2",
            "data.microbatches=4", "train.timeline_first=0", "train.timeline_every=0", f"pipeline.schedule={sched}"])
        summary = run(cfg, tmp / sched)
        records = [r for r in map(json.loads, open(tmp / sched / "metrics.jsonl")) if r["kind"] == "train"]
        out[sched] = (summary, records, tmp / sched)
    return out


def test_pipelined_run_from_checkpoint_starts_at_the_reference_loss(pretrained_runs):
    (summary, dip, _), (_, ref, _) = pretrained_runs["dip"], pretrained_runs["none"]
    assert summary["mesh"] == {"data": 1, "pipe": 2, "tensor": 2}
    np.testing.assert_allclose(dip[0]["loss"], ref[0]["loss"], rtol=1e-5)
    saved = json.loads((pretrained_runs["dip"][2] / "config.json").read_text())["model"]["llm"]
    assert (saved["norm_eps"], saved["qkv_bias"]) == (1e-5, True)       # resolved from config.json


def test_export_of_trained_run_loads_in_transformers_and_equals_forward(pretrained_runs, tmp_path):
    workdir = pretrained_runs["dip"][2]
    out = tmp_path / "export"
    res = run_cli("dip_jax.hf", "export", "--workdir", str(workdir), "--module", "llm", "--out", str(out),
                  "--max-shard-mb", "0.2", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model.safetensors.index.json").exists()
    ids = np.random.RandomState(3).randint(0, 256, (2, 9))
    np.savez(tmp_path / "in.npz", input_ids=ids)
    assert cli.main(["forward", "--checkpoint", str(out), "--inputs", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "out.npz")]) == 0
    ours = np.load(tmp_path / "out.npz")["logits"]
    back = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = back(torch.tensor(ids)).logits.numpy()
        before = pretrained_runs["model"](torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert np.abs(theirs - before).max() > 1e-3 * np.abs(before).max()     # the export is the trained state


@pytest.fixture(scope="module")
def llava_runs(root, tmp_path_factory, xla_cache):
    """configs/llava_tiny.py on scripts/make_tiny_hf.py's checkpoints, 2 steps, DIP and the
    unpipelined reference."""
    import subprocess
    import sys
    from dip_jax.config.overrides import apply_overrides, load_config_file
    from dip_jax.train.trainer import run
    tmp = tmp_path_factory.mktemp("llava")
    subprocess.run([sys.executable, str(root / "scripts/make_tiny_hf.py"), "--out", str(tmp / "hf")], check=True,
                   capture_output=True, timeout=300)
    out = {"hf": tmp / "hf"}
    for sched in ("dip", "none"):
        cfg = apply_overrides(load_config_file(root / "configs/llava_tiny.py"), [
            f"model.vision.init_from={tmp / 'hf/siglip'}", f"model.llm.init_from={tmp / 'hf/qwen2'}",
            "train.progress=false", f"pipeline.compile_cache_dir={xla_cache}", "train.steps=2", "checkpoint.every=2",
            "train.timeline_first=0", "train.timeline_every=0", f"pipeline.schedule={sched}"])
        run(cfg, tmp / sched)
        out[sched] = [r for r in map(json.loads, open(tmp / sched / "metrics.jsonl")) if r["kind"] == "train"]
    out["workdir"] = tmp / "dip"
    return out


def test_llava_tiny_trains_pipelined_with_the_pretrained_tower_frozen(llava_runs):
    import jax
    from dip_jax.hf.convert import load_params, open_checkpoint
    from dip_jax.train.export import module_config, read_params
    np.testing.assert_allclose(llava_runs["dip"][0]["loss"], llava_runs["none"][0]["loss"], rtol=1e-5)
    _, trained = read_params(llava_runs["workdir"] / "checkpoints", "vision", None)
    cfg = module_config(json.loads((llava_runs["workdir"] / "config.json").read_text()), "vision")
    assert (cfg.layers, cfg.norm, cfg.head_norm, cfg.mlp) == (4, "layer", False, "gelu_tanh")
    ckpt, family = open_checkpoint(cfg.init_from, "vision")
    loaded = load_params(ckpt, family, cfg, trained)
    flat = lambda t: {k: v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    got, want = flat(trained), flat(loaded)
    for key in want:
        if "projector" not in jax.tree_util.keystr(key):        # the tower is the checkpoint's, unchanged
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=str(key))
    # while the backbone did train in those steps (so an unfrozen tower would have moved too)
    _, llm = read_params(llava_runs["workdir"] / "checkpoints", "llm", None)
    llm_cfg = module_config(json.loads((llava_runs["workdir"] / "config.json").read_text()), "llm")
    ckpt, family = open_checkpoint(llm_cfg.init_from, "llm")
    start = load_params(ckpt, family, llm_cfg, llm)
    trained_llm, start = flat(llm), flat(start)
    assert all(not np.array_equal(np.asarray(trained_llm[k]), np.asarray(start[k])) for k in start
               if "blocks" in jax.tree_util.keystr(k))
