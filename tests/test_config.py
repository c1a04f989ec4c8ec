import dataclasses

import pytest

from conftest import run_cli
from dip_jax.config import ConfigError, ModelConfig, TrainConfig, VisionConfig
from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args


@pytest.fixture
def tiny(root):
    return load_config_file(root / "configs/tiny_cpu.py")


def test_overrides_set_nested_typed_values(tiny):
    cfg = apply_overrides(tiny, ["model.llm.layers=8", "optim.lr=1e-3", "train.progress=false",
                                 "optim.frozen=('vision',)", "model.audio=none"])
    assert cfg.model.llm.layers == 8 and cfg.optim.lr == 1e-3 and cfg.train.progress is False
    assert cfg.optim.frozen == ("vision",) and cfg.model.audio is None
    assert tiny.model.llm.layers == 4, "overrides must not mutate the original"


@pytest.mark.parametrize("override, key", [
    ("model.nonexistent=1", "config.model.nonexistent"),
    ("nosection.x=1", "config.nosection"),
    ("optim.lr=abc", "config.optim.lr"),
    ("model.llm.layers=2.5", "config.model.llm.layers"),
    ("train.progress=maybe", "config.train.progress"),
    ("model.llm=none", "config.model.llm"),
    ("model.llm.layers=2", "model.llm.layers"),          # fewer layers than mesh.pipe=4
    ("data.microbatches=3", "data.microbatches"),         # not divisible by mesh.data=2
    ("pipeline.schedule=zigzag", "pipeline.schedule"),
    ("optim.frozen=('dit',)", "optim.frozen"),            # not in this model
])
def test_bad_overrides_name_the_key(tiny, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(tiny, [override])


def test_section_of_disabled_module_is_an_error(tiny):
    cfg = apply_overrides(tiny, ["model.audio=none"])
    with pytest.raises(ConfigError, match="disabled"):
        apply_overrides(cfg, ["model.audio.layers=2"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="model.vision.dim"):
        TrainConfig(model=ModelConfig(vision=VisionConfig(dim=30, heads=4)))
    with pytest.raises(ConfigError, match="patch_size"):
        dataclasses.replace(TrainConfig(), model=ModelConfig(vision=VisionConfig(image_size=10, patch_size=4)))


def test_argv_parsing():
    path, workdir, ov, rest = parse_config_args(
        ["--config", "c.py", "--workdir=w", "--config.a.b=1", "--config.c.d", "2", "--x"])
    assert (path, workdir, ov, rest) == ("c.py", "w", ["a.b=1", "c.d=2"], ["--x"])


@pytest.mark.parametrize("override, key", [("--config.model.nonexistent=1", "model.nonexistent"),
                                           ("--config.optim.lr=abc", "optim.lr")])
def test_cli_rejects_bad_override_with_one_line(override, key):
    res = run_cli("dip_jax.train", "--config", "configs/tiny_cpu.py", override, timeout=120)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and key in lines[0], res.stderr


def test_cli_rejects_mesh_larger_than_devices(tmp_path):
    res = run_cli("dip_jax.train", "--config", "configs/tiny_cpu.py", "--config.mesh.data=4",
                  "--config.data.microbatches=16", f"--workdir={tmp_path}", timeout=180)
    assert res.returncode != 0 and "mesh" in res.stderr.splitlines()[-1], res.stderr


def test_files_task_tokenizer_defaults_to_the_backbones_checkpoint(root, tmp_path):
    from dip_jax.config import ConfigError
    from dip_jax.config.overrides import apply_overrides, load_config_file
    base = load_config_file(root / "configs/tiny_cpu.py")
    files = ["data.task=files", f"data.path={tmp_path / 'train.jsonl'}", "model.audio=none"]
    with pytest.raises(ConfigError, match="data.tokenizer: the files task needs a tokenizer directory"):
        apply_overrides(base, files)
    ckpt = tmp_path / "llm"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match="data.tokenizer"):        # a checkpoint without a tokenizer
        apply_overrides(base, [*files, f"model.llm.init_from={ckpt}"])
    (ckpt / "tokenizer.json").write_text("{}")
    cfg = apply_overrides(base, [*files, f"model.llm.init_from={ckpt}"])
    assert cfg.tokenizer_dir() == str(ckpt)
    own = tmp_path / "own"
    assert apply_overrides(base, [*files, f"model.llm.init_from={ckpt}", f"data.tokenizer={own}"]).tokenizer_dir() == str(own)
