"""Hugging Face checkpoints against transformers itself (the reference), offline: tiny random
models of each family saved with save_pretrained (sharded and not), imported through the
forward checker, exported and reloaded; broken checkpoints fail in one line, exit 2."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import run_cli
from dip_jax.config import LLMConfig
from dip_jax.hf import __main__ as cli
from dip_jax.hf.convert import export_directory, resolve_model
from dip_jax.hf.forward import forward, load_module
from dip_jax.hf.safetensors_io import HFError

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4}
BACKBONES = {
    # GQA, untied, Llama-3 rope scaling and theta, checkpoint epsilon; saved in 5 shards
    "llama_gqa": ("LlamaForCausalLM", dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                                           rope_scaling=LLAMA3_ROPE), "20KB"),
    # MHA, tied embeddings, every linear biased
    "llama_mha_tied": ("LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                attention_bias=True, mlp_bias=True), None),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, rms_norm_eps=1e-6), "16KB"),
    "qwen2_tied": ("Qwen2ForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True), None),
}


def save_backbone(path, cls: str, extra: dict, shard=None, seed=0):
    torch.manual_seed(seed)
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls)(config_cls(**TINY, **extra)).eval()
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, save_backbone(root / name, cls, extra, shard))
            for name, (cls, extra, shard) in BACKBONES.items()}


def ids(seed=0, shape=(2, 11)):
    return np.random.RandomState(seed).randint(0, TINY["vocab_size"], shape)


def hf_logits(model, input_ids):
    with torch.no_grad():
        return model(torch.tensor(input_ids)).logits.numpy()


def assert_parity(out, ref):
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(out - ref).max()
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_checker_matches_transformers(backbones, tmp_path, name):
    path, model = backbones[name]
    x = ids()
    np.savez(tmp_path / "in.npz", input_ids=x)
    assert cli.main(["forward", "--checkpoint", str(path), "--inputs", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "out.npz")]) == 0
    assert_parity(np.load(tmp_path / "out.npz")["logits"], hf_logits(model, x))
    if BACKBONES[name][2]:
        assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2


def test_negative_control_wrong_epsilon_breaks_parity(backbones):
    """The checkpoint's epsilon matters at this tolerance: the same parameters in a module at
    flax's default 1e-6 instead of config.json's 1e-5 fail the parity check."""
    import dataclasses
    from flax import nnx
    from dip_jax.models.llm import LLM
    path, model = backbones["llama_gqa"]
    _, cfg, module = load_module(path)
    assert cfg.norm_eps == 1e-5
    wrong_cfg = dataclasses.replace(cfg, norm_eps=1e-6)
    wrong = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LLM(wrong_cfg, nnx.Rngs(0)))), nnx.state(module))
    x = ids()
    out = wrong({"tokens": x, "segment_ids": np.ones_like(x), "positions": np.broadcast_to(np.arange(11), x.shape)})
    with pytest.raises(AssertionError):
        assert_parity(np.asarray(out[1]), hf_logits(model, x))


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied"])
def test_export_round_trip_reloads_in_transformers(backbones, tmp_path, name):
    """import -> export (no training) -> transformers.from_pretrained: the original outputs
    within 1e-5 relative; the export is sharded with an index and keeps the config's family."""
    import jax
    from flax import nnx
    path, model = backbones[name]
    family, cfg, module = load_module(path)
    params = jax.tree.map(np.asarray, nnx.state(module))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = export_directory("llm", _with_source(cfg, path), params, tmp_path / "out", max_shard_bytes=20_000)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    (path / "tokenizer_config.json").unlink()
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == family.model_type
    back = getattr(transformers, BACKBONES[name][0]).from_pretrained(out).eval()
    x = ids(1)
    ref, got = hf_logits(model, x), hf_logits(back, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_export_of_a_module_trained_from_scratch_is_a_llama(tmp_path):
    """No init_from: the default block (RMSNorm at 1e-6, bias-free SwiGLU, rope theta) exports as
    a fresh LlamaForCausalLM config whose transformers logits equal dip_jax's."""
    import jax
    from flax import nnx
    from dip_jax.models.llm import LLM
    cfg = LLMConfig(layers=2, dim=32, mlp_hidden=48, heads=4, kv_heads=2, vocab_size=64, rope_theta=5000.0)
    module = LLM(cfg, nnx.Rngs(3))
    out = export_directory("llm", cfg, jax.tree.map(np.asarray, nnx.state(module)), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = ids(2)
    ours = np.asarray(module({"tokens": x, "segment_ids": np.ones_like(x),
                              "positions": np.broadcast_to(np.arange(x.shape[1]), x.shape)})[1])
    assert_parity(ours, hf_logits(back, x))


def _with_source(cfg, path):
    import dataclasses
    return dataclasses.replace(cfg, init_from=str(path))


def test_conflicting_override_names_both_values(backbones):
    path, _ = backbones["qwen2"]
    from dip_jax.config import ModelConfig
    with pytest.raises(HFError, match=r"model\.llm\.dim=48 conflicts with .*config\.json, which gives 32"):
        resolve_model(ModelConfig(vision=None, audio=None, llm=LLMConfig(dim=48, heads=4, init_from=str(path))))
    cfg = resolve_model(ModelConfig(vision=None, audio=None, llm=LLMConfig(init_from=str(path))))
    assert (cfg.llm.dim, cfg.llm.kv_heads, cfg.llm.qkv_bias, cfg.llm.out_bias) == (32, 2, True, False)


def _broken(backbones, tmp_path, name="qwen2"):
    dst = tmp_path / "ckpt"
    shutil.copytree(backbones[name][0], dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


BREAKS = {
    "shape": (lambda p: _edit_config(p, intermediate_size=40), r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape"),
    "extra tensor": (lambda p: _edit_config(p, num_hidden_layers=1), r"tensor model\.layers\.1\.\S+ is not part"),
    "missing tensor": (lambda p: _edit_config(p, num_hidden_layers=3), r"tensor model\.layers\.2\.\S+ is missing"),
    "missing shard": (lambda p: _shards(p)[1].unlink(), r"shard model-00002-of-\d+\.safetensors .*is missing"),
    "model_type": (lambda p: _edit_config(p, model_type="gpt17"), r"config\.json: unknown model_type 'gpt17'"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_broken_checkpoint_is_one_line_naming_file_and_tensor(backbones, tmp_path, case):
    path = _broken(backbones, tmp_path)
    breaks, pattern = BREAKS[case]
    breaks(path)
    with pytest.raises(HFError, match=pattern) as err:
        forward(path, {"input_ids": ids()})
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_cli_error_exits_2_with_one_line(backbones, tmp_path):
    path = _broken(backbones, tmp_path)
    _shards(path)[0].unlink()
    np.savez(tmp_path / "in.npz", input_ids=ids())
    res = run_cli("dip_jax.hf", "forward", "--checkpoint", str(path), "--inputs", str(tmp_path / "in.npz"),
                  "--out", str(tmp_path / "out.npz"), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model-00001-of-" in lines[0] and "missing" in lines[0], res.stderr


TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
             patch_size=4, num_channels=3)
TOWERS = {
    "siglip": ("SiglipVisionModel", dict(layer_norm_eps=1e-6), "12KB"),       # + its pooling head, unused
    "clip": ("CLIPVisionModel", dict(layer_norm_eps=1e-5), None),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    out = {}
    for name, (cls, extra, shard) in TOWERS.items():
        torch.manual_seed(1)
        config = getattr(transformers, cls.replace("Model", "Config"))(**TOWER, **extra)
        model = getattr(transformers, cls)(config).eval()
        model.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        out[name] = (root / name, model)
    return out


def pixels(seed=0):
    return np.random.RandomState(seed).randn(2, 3, 16, 16).astype(np.float32)


@pytest.mark.parametrize("name", list(TOWERS))
def test_vision_tower_last_hidden_state_matches_transformers(towers, tmp_path, name):
    path, model = towers[name]
    np.savez(tmp_path / "in.npz", pixel_values=pixels())
    assert cli.main(["forward", "--checkpoint", str(path), "--inputs", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "out.npz")]) == 0
    out = np.load(tmp_path / "out.npz")["last_hidden_state"]
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(pixels())).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 16 + (name == "clip"), 32)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_feature_layer_keeps_the_layers_up_to_llava_hidden_state(towers):
    """vision_feature_layer=-2: the tower's first 2 of 3 layers, no final norm: transformers'
    hidden_states[-2]; the last layer's tensors stay unread."""
    import jax.numpy as jnp
    from flax import nnx
    from dip_jax.config import ModelConfig, VisionConfig
    from dip_jax.hf.convert import load_params, open_checkpoint
    from dip_jax.models.vit import ViT
    path, model = towers["clip"]
    cfg = resolve_model(ModelConfig(audio=None, vision=VisionConfig(init_from=str(path), feature_layer=-2,
                                                                    spatial_merge=2))).vision
    assert (cfg.layers, cfg.head_norm, cfg.class_token) == (2, False, True)
    ckpt, family = open_checkpoint(path, "vision")
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: ViT(cfg, 24, nnx.Rngs(0))))
    vit = nnx.merge(graphdef, load_params(ckpt, family, cfg, shapes, put=jnp.asarray))
    x = vit.run_blocks(vit.layer_params(), vit.embed(jnp.asarray(pixels().transpose(0, 2, 3, 1))), None)
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(pixels()), output_hidden_states=True).hidden_states[-2].numpy()
    assert np.abs(np.asarray(vit.features(x)) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert vit.head(x).shape == (2, 4, 24)        # class token dropped, 2x2 merge, projected


WHISPER = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=12, vocab_size=64,
               max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


@pytest.mark.parametrize("shard", [None, "10KB"])
def test_whisper_encoder_last_hidden_state_matches_transformers(tmp_path, shard):
    """WhisperModel (encoder + decoder saved; the decoder unread): the encoder's two-conv stem
    (strides 1, 2; torch padding; exact GELU), its position table and k_proj without a bias."""
    torch.manual_seed(2)
    model = transformers.WhisperModel(transformers.WhisperConfig(**WHISPER)).eval()
    model.save_pretrained(tmp_path / "whisper", **({"max_shard_size": shard} if shard else {}))
    x = np.random.RandomState(0).randn(2, 8, 24).astype(np.float32)
    np.savez(tmp_path / "in.npz", input_features=x)
    assert cli.main(["forward", "--checkpoint", str(tmp_path / "whisper"), "--inputs", str(tmp_path / "in.npz"),
                     "--out", str(tmp_path / "out.npz")]) == 0
    out = np.load(tmp_path / "out.npz")["last_hidden_state"]
    with torch.no_grad():
        ref = model.encoder(torch.tensor(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 12, 32)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
