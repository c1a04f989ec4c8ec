import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dip_jax.config import AudioConfig, DiTConfig, LLMConfig, ModelConfig, VisionConfig
from dip_jax.models.audio import AudioEncoder
from dip_jax.models.dit import DiT
from dip_jax.models.llm import LLM
from dip_jax.models.lmm import abstract_model, build_model, module_param_counts
from dip_jax.models.stack import slice_layers
from dip_jax.models.vit import ViT
from dip_jax.config.overrides import load_config_file
from dip_jax.config.zoo import PAPER_MODELS

VIS = VisionConfig(layers=5, dim=32, mlp_hidden=48, heads=4, kv_heads=2, image_size=16, patch_size=4,
                   channels=3, spatial_merge=2)
AUD = AudioConfig(layers=5, dim=32, mlp_hidden=48, heads=4, kv_heads=2, mel_bins=8, frames_per_second=16)
LLM_CFG = LLMConfig(layers=5, dim=32, mlp_hidden=48, heads=4, kv_heads=1, vocab_size=64)
DIT_CFG = DiTConfig(layers=5, dim=32, mlp_hidden=48, heads=4, kv_heads=4, latent_channels=4,
                    latent_frames_per_second=2, tokens_per_frame=3, cond_tokens=6, time_embed_dim=16)


def _inputs(name, rng):
    r = np.random.default_rng(0)
    if name == "vision":
        return jnp.asarray(r.standard_normal((3, 16, 16, 3)), jnp.float32)
    if name == "audio":
        return jnp.asarray(r.standard_normal((3, AUD.frames_per_clip, 8)), jnp.float32)
    if name == "llm":
        seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3] * 2)
        pos = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3] * 2)
        return {"tokens": jnp.asarray(r.integers(0, 64, (2, 12))), "segment_ids": seg, "positions": pos}
    return {"x_t": jnp.asarray(r.standard_normal((3, DIT_CFG.tokens_per_clip, 4)), jnp.float32),
            "t": jnp.asarray([0.1, 0.5, 0.9], jnp.float32),
            "cond": jnp.asarray(r.standard_normal((3, 6, 24)), jnp.float32),
            "cond_mask": jnp.asarray([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5])}


MODULES = {
    "vision": (lambda: ViT(VIS, 24, nnx.Rngs(0)), (3, VIS.tokens_per_image, 24)),
    "audio": (lambda: AudioEncoder(AUD, 24, nnx.Rngs(0)), (3, AUD.tokens_per_clip, 24)),
    "llm": (lambda: LLM(LLM_CFG, nnx.Rngs(0)), (2, 12, 64)),
    "dit": (lambda: DiT(DIT_CFG, 24, nnx.Rngs(0)), (3, DIT_CFG.tokens_per_clip, 4)),
}


@pytest.mark.parametrize("name", MODULES)
def test_module_output_shape(name):
    build, shape = MODULES[name]
    out = build()(_inputs(name, 0))
    out = out[1] if name == "llm" else out
    assert out.shape == shape and bool(jnp.all(jnp.isfinite(out)))


def _run_in_chunks(module, inputs, cuts):
    ctx, carry = module.context(inputs), module.embed(inputs)
    params = module.layer_params()
    for a, b in zip(cuts[:-1], cuts[1:]):
        carry = module.run_blocks(slice_layers(params, a, b), carry, ctx)
    return module.head(carry)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("cuts", [(0, 1, 2, 5), (0, 2, 4, 5), (0, 1, 4, 5), (0, 3, 4, 5)])
def test_three_chunks_equal_whole_module(name, cuts):
    build, _ = MODULES[name]
    module = build()
    inputs = _inputs(name, 0)
    whole = jax.tree.leaves(module(inputs))
    chunked = jax.tree.leaves(_run_in_chunks(module, inputs, cuts))
    for w, c in zip(whole, chunked):
        np.testing.assert_allclose(np.asarray(c), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_chunk_negative_control_skipping_a_layer_differs():
    build, _ = MODULES["llm"]
    module = build()
    inputs = _inputs("llm", 0)
    whole = module(inputs)[1]
    skipped = _run_in_chunks(module, inputs, (0, 2, 5))
    ctx, carry = module.context(inputs), module.embed(inputs)
    p = module.layer_params()
    carry = module.run_blocks(slice_layers(p, 0, 2), carry, ctx)
    carry = module.run_blocks(slice_layers(p, 3, 5), carry, ctx)   # layer 2 dropped
    assert np.allclose(skipped[1], whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(module.head(carry)[1], whole, rtol=1e-3, atol=1e-3)


def test_llm_segments_do_not_attend_across_samples():
    module = LLM(LLM_CFG, nnx.Rngs(0))
    inputs = _inputs("llm", 0)
    changed = dict(inputs, tokens=inputs["tokens"].at[:, 0].set((inputs["tokens"][:, 0] + 1) % 64))
    a, b = module(inputs)[1], module(changed)[1]
    np.testing.assert_allclose(a[:, 5:9], b[:, 5:9], rtol=1e-6)          # segment 2 unaffected
    assert not np.allclose(a[:, 1:5], b[:, 1:5])                        # segment 1 affected


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_param_counts_match_analytic_formula(root, name):
    cfg = load_config_file(root / f"configs/{name}.py").model
    counts = module_param_counts(abstract_model(cfg))     # nnx.eval_shape: nothing allocated
    assert counts == {m: cfg.module_param_count(m) for m in cfg.modules}
    assert sum(counts.values()) == cfg.param_count()


def test_tiny_param_counts_match_formula_with_every_module():
    cfg = ModelConfig(vision=VIS, audio=AUD, llm=LLM_CFG, dit=DIT_CFG)
    counts = module_param_counts(build_model(cfg))
    assert counts == {m: cfg.module_param_count(m) for m in cfg.modules}


# the block families pretrained checkpoints need, each option away from its default
FAMILIES = {
    "layernorm_gelu_biases": dict(norm="layer", norm_eps=1e-5, mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True),
    "gelu_tanh": dict(mlp="gelu_tanh", out_bias=True),
    "quick_gelu_qkv_bias": dict(mlp="quick_gelu", qkv_bias=True),
    "swiglu_biases": dict(qkv_bias=True, mlp_bias=True, norm_eps=1e-5),
    "whisper_like": dict(norm="layer", mlp="gelu", qkv_bias=True, k_bias=False, out_bias=True, mlp_bias=True),
}


def _family_model(opts, tied=True):
    import dataclasses
    r = lambda c, **kw: dataclasses.replace(c, **opts, **kw)
    extra = dict(tie_embeddings=tied, rope_scaling=(("factor", 4.0), ("rope_type", "linear"))) if tied else {}
    vis = dict(class_token=True, patch_bias=False, pre_norm=True, head_norm=False) if tied else {}
    aud = dict(conv_strides=(1, 2), conv_padding="torch", conv_act="gelu") if tied else {}
    return ModelConfig(vision=r(VIS, **vis), audio=r(AUD, **aud), llm=r(LLM_CFG, **extra), dit=r(DIT_CFG))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_family_param_counts_match_formula(family):
    cfg = _family_model(FAMILIES[family], tied=family != "gelu_tanh")
    counts = module_param_counts(abstract_model(cfg))
    assert counts == {m: cfg.module_param_count(m) for m in cfg.modules}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_family_chunks_equal_whole_module(family):
    import dataclasses
    cfg = dataclasses.replace(LLM_CFG, **FAMILIES[family], tie_embeddings=True)
    model = LLM(cfg, nnx.Rngs(0))
    x = _inputs("llm", None)
    whole = model(x)[1]
    ctx, params = model.context(x), model.layer_params()
    carry = model.embed(x)
    for a, b in ((0, 2), (2, 5)):
        carry = model.run_blocks(slice_layers(params, a, b), carry, ctx)
    np.testing.assert_allclose(np.asarray(model.head(carry)[1]), np.asarray(whole), rtol=1e-5, atol=1e-6)
    assert "lm_head" not in nnx.state(model) or nnx.state(model)["lm_head"] is None


def test_defaults_are_the_plain_block():
    """The new options at their defaults build exactly the module of before: same parameter
    tree and values (RMSNorm at flax's epsilon, bias-free SwiGLU, untied head)."""
    state = nnx.state(LLM(LLM_CFG, nnx.Rngs(0)))
    leaves = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert not any("bias" in k for k in leaves) and any("lm_head" in k for k in leaves)
    assert LLM(LLM_CFG, nnx.Rngs(0)).blocks.attn_norm.epsilon == 1e-6


@pytest.mark.parametrize("family", ["layernorm_gelu_biases", "whisper_like"])
def test_block_family_in_bf16_keeps_float32_parameters_and_tracks_float32(family):
    import dataclasses
    cfg = dataclasses.replace(LLM_CFG, **FAMILIES[family], tie_embeddings=True)
    f32, bf16 = LLM(cfg, nnx.Rngs(0)), LLM(cfg, nnx.Rngs(0), jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))
    x = _inputs("llm", None)
    a, b = np.asarray(f32(x)[1]), np.asarray(bf16(x)[1].astype(jnp.float32))
    assert bf16(x)[1].dtype == jnp.bfloat16
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
