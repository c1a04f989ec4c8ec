"""Attention backends (model.attention): every backend that runs here equals the xla path.

Outputs and gradients (q, k, v) on the same inputs: causal + packed segments + grouped-query
attention, bidirectional segments with one kv head, cross-attention (T != S) under a key mask
with fully masked rows, and no mask at all; float32 to ~1e-5, bfloat16 looser. Tiles are
smaller than the sequences and do not divide them, so the tiling and its padding are exercised.
Negative controls: blockwise with the causal flag dropped, or the segments ignored, differs.
Residuals: the blockwise gradient at S=4096 compiles to far less temporary memory than the
S x S scores, the xla one to more. The LMM's loss and gradients are the same under xla and
blockwise.

splash runs here in Pallas interpret mode (jax 0.10.2 can interpret the TPU kernel on CPU);
selecting it, or cudnn, off its platform fails with a one-line config error. cudnn itself
cannot run without a GPU: only its selection and its refusal are tested here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dip_jax.config import (BlockConfig, ConfigError, DataConfig, DiTConfig, LLMConfig, MeshConfig,
                            ModelConfig, TrainConfig, VisionConfig)
from dip_jax.data.pipeline import PackedBatches
from dip_jax.models import attention as A
from dip_jax.models.layers import Attention, attention_mask
from dip_jax.models.lmm import LMM

BF16 = jnp.dtype("bfloat16")
TILES = dict(block_q=8, block_k=16)     # S=37 -> 5 query tiles, the last padded; T=37 -> 3 key tiles


def _packed(rng, b, s):
    """Packed segments 1, 2, 3 then 0-padding, per row."""
    seg = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(2, s - 1), 3, replace=False))
        for i, (a, c) in enumerate(zip((0, *cuts[:-1]), cuts), start=1):
            seg[r, a:c] = i
    return jnp.asarray(seg)


def _case(name, dtype=jnp.float32):
    """(q, k, v, q_segment_ids, kv_segment_ids, causal)."""
    rng = np.random.default_rng(0)
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
    B, S, d = 2, 37, 16
    if name == "causal_segments_gqa":            # the llm: 4 heads over 2 kv heads
        seg = _packed(rng, B, S)
        return x(B, S, 4, d), x(B, S, 2, d), x(B, S, 2, d), seg, seg, True
    if name == "segments_mqa":                   # bidirectional packed items, one kv head
        seg = _packed(rng, B, S)
        return x(B, S, 4, d), x(B, S, 1, d), x(B, S, 1, d), seg, seg, False
    if name == "cross_fully_masked_rows":        # T != S, a key mask, and queries that see nothing
        T = 21
        qs = jnp.ones((B, S), jnp.int32).at[0, 5:12].set(2).at[1, 30:].set(3)
        ks = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int32).at[:, :2].set(1).at[0, 20].set(2)
        qs = qs.at[0, 5:11].set(4)               # rows 5..10 of sequence 0 see no key at all
        return x(B, S, 4, d), x(B, T, 2, d), x(B, T, 2, d), qs, ks, False
    if name == "causal_only":
        return x(B, S, 4, d), x(B, S, 4, d), x(B, S, 4, d), None, None, True
    return x(B, S, 4, d), x(B, 29, 2, d), x(B, 29, 2, d), None, None, False   # "unmasked_cross"


CASES = ("causal_segments_gqa", "segments_mqa", "cross_fully_masked_rows", "causal_only", "unmasked_cross")


def _xla(q, k, v, qs, ks, causal):
    return A.xla_attention(q, k, v, qs, ks, causal)


def _blockwise(q, k, v, qs, ks, causal):
    return A.blockwise_attention(q, k, v, qs, ks, causal, **TILES)


def _splash(q, k, v, qs, ks, causal):
    return A.splash_attention(q, k, v, qs, ks, causal, interpret=True)


def _value_and_grads(fn, q, k, v, qs, ks, causal):
    """The output and d/d(q, k, v) of a loss that weighs every output element differently."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, qs, ks, causal).astype(jnp.float32) * w)
    return fn(q, k, v, qs, ks, causal), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _close(got, want, rtol, atol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", CASES)
def test_blockwise_equals_xla_outputs_and_gradients(name):
    case = _case(name)
    _close(_value_and_grads(_blockwise, *case), _value_and_grads(_xla, *case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ("causal_segments_gqa", "cross_fully_masked_rows"))
def test_blockwise_equals_xla_in_bfloat16(name):
    case = _case(name, BF16)
    (out, grads), (ref, ref_grads) = _value_and_grads(_blockwise, *case), _value_and_grads(_xla, *case)
    assert out.dtype == BF16 and all(g.dtype == BF16 for g in grads)
    _close((out, grads), (ref, ref_grads), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ("causal_segments_gqa", "cross_fully_masked_rows"))
def test_splash_in_interpret_mode_equals_xla(name):
    case = _case(name)
    _close(_value_and_grads(_splash, *case), _value_and_grads(_xla, *case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", (_xla, _blockwise, _splash), ids=("xla", "blockwise", "splash"))
def test_fully_masked_rows_give_zero_output_and_zero_gradients(fn):
    q, k, v, qs, ks, causal = _case("cross_fully_masked_rows")
    out, (dq, dk, dv) = _value_and_grads(fn, q, k, v, qs, ks, causal)
    assert np.all(np.asarray(out[0, 5:11]) == 0) and np.all(np.asarray(dq[0, 5:11]) == 0)
    assert np.abs(np.asarray(out[0, 11:])).max() > 0.1             # the other rows are not zeroed
    # the rows that see nothing send nothing back to the keys: dk, dv as if they were absent
    keep = jnp.ones(q.shape[1], bool).at[5:11].set(False)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * keep[None, :, None, None]
    loss = lambda k, v: jnp.sum(fn(q, k, v, qs, ks, causal) * w)
    dk0, dv0 = jax.grad(loss, argnums=(0, 1))(k, v)
    np.testing.assert_allclose(np.asarray(dk[0]), np.asarray(dk0[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dv[0]), np.asarray(dv0[0]), rtol=1e-5, atol=1e-5)


def test_xla_backend_gives_the_same_bits_as_the_dense_mask_call():
    """The Attention layer with segment ids + causal (the xla backend) is exactly the call the
    models made before: jax.nn.dot_product_attention over attention_mask."""
    attn = Attention(BlockConfig(dim=32, heads=4, kv_heads=2), nnx.Rngs(0))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 37, 32)), jnp.float32)
    seg = _packed(rng, 2, 37)
    got = jax.jit(lambda x: attn(x, segment_ids=seg, causal=True))(x)
    want = jax.jit(lambda x: attn(x, mask=attention_mask(seg, causal=True)))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_negative_controls_blockwise_without_causality_or_segments_differs():
    q, k, v, seg, _, _ = _case("causal_segments_gqa")
    ref = _xla(q, k, v, seg, seg, True)
    no_causal = _blockwise(q, k, v, seg, seg, False)
    no_segments = _blockwise(q, k, v, None, None, True)
    assert np.abs(np.asarray(no_causal - ref)).max() > 1e-1
    assert np.abs(np.asarray(no_segments - ref)).max() > 1e-1


def _temp_bytes(fn, S):
    B, H, KV, d = 1, 2, 1, 32
    q, kv = jax.ShapeDtypeStruct((B, S, H, d), jnp.float32), jax.ShapeDtypeStruct((B, S, KV, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((B, S), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s, s, True))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text(), B * H * S * S * 4


def test_blockwise_gradient_residuals_are_far_below_the_scores():
    """At S=4096 (2 heads) one float32 score matrix is 128 MiB; the blockwise gradient holds
    tiles of 512 x 512 and O(S) carries, with no conditional in its program."""
    blockwise = lambda *a: A.blockwise_attention(*a)
    temp, hlo, scores = _temp_bytes(blockwise, 4096)
    xla_temp, _, _ = _temp_bytes(_xla, 4096)
    assert temp < scores / 8, (temp, scores)
    assert xla_temp > scores, (xla_temp, scores)
    assert " conditional(" not in hlo


def test_auto_rule_and_one_log_line(capsys):
    f32, bf16 = jnp.float32, BF16
    assert A.choose("auto", bf16, 4096, 4096, 128, platform="gpu") == "cudnn"
    assert A.choose("auto", f32, 4096, 4096, 128, platform="gpu") == "blockwise"     # cuDNN wants bf16/fp16
    assert A.choose("auto", bf16, 4096, 4096, 160, platform="gpu") == "blockwise"    # head dim it may refuse
    assert A.choose("auto", f32, 4096, 4096, 64, platform="cpu") == "blockwise"
    assert A.choose("auto", f32, 512, 512, 64, platform="cpu") == "xla"
    assert A.choose("auto", bf16, 4096, 4096, 128, dense_mask=True, platform="gpu") == "xla"
    assert A.choose("blockwise", f32, 8, 8, 64, platform="cpu") == "blockwise"
    q, k, v, seg, _, causal = _case("causal_segments_gqa")
    A._logged.clear()
    for _ in range(2):
        out = A.attention(q, k, v, backend="auto", q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_xla(q, k, v, seg, seg, causal)))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "model.attention=auto" in ln]
    assert lines == ["dip_jax: model.attention=auto -> xla (cpu, float32, 37 x 37)"]


@pytest.mark.parametrize("name", ("cudnn", "splash"))
def test_a_backend_this_machine_lacks_fails_at_model_build(name):
    cfg = ModelConfig(vision=None, audio=None, llm=LLMConfig(layers=1, dim=16, mlp_hidden=16, heads=2, kv_heads=1),
                      compute_dtype="bfloat16", attention=name)
    cfg.check()                                   # a valid key: the machine decides, at build time
    with pytest.raises(ConfigError) as e:
        LMM(cfg, nnx.Rngs(0))
    msg = str(e.value)
    assert msg.startswith(f"model.attention: {name} ") and "\n" not in msg and "cpu" in msg
    q, k, v, seg, _, causal = _case("causal_segments_gqa", BF16)
    with pytest.raises(ConfigError, match="model.attention"):
        A.attention(q, k, v, backend=name, q_segment_ids=seg, kv_segment_ids=seg, causal=causal)


def test_cudnn_refuses_float32_even_on_a_gpu():
    with pytest.raises(ConfigError, match="model.compute_dtype is float32"):
        A.check("cudnn", jnp.float32, platform="gpu")
    A.check("cudnn", BF16, platform="gpu")


def test_config_rejects_an_unknown_backend():
    with pytest.raises(ConfigError, match=r"^model.attention: unknown attention backend 'flash'"):
        ModelConfig(attention="flash").check()


def test_a_dense_mask_needs_the_xla_backend():
    q, k, v, seg, _, _ = _case("causal_segments_gqa")
    with pytest.raises(ConfigError, match="not a dense mask"):
        A.attention(q, k, v, backend="blockwise", mask=attention_mask(seg, causal=True))


# -- the model -------------------------------------------------------------------------------

BLK = dict(dim=16, mlp_hidden=32, heads=4, kv_heads=2)


def _lmm_config(attention: str) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            vision=VisionConfig(layers=1, image_size=8, patch_size=2, channels=1, spatial_merge=2, **BLK),
            audio=None,
            llm=LLMConfig(layers=2, vocab_size=64, **BLK),
            dit=DiTConfig(layers=1, latent_channels=4, latent_frames_per_second=2, tokens_per_frame=3,
                          cond_tokens=6, time_embed_dim=16, **BLK),
            attention=attention),
        mesh=MeshConfig(data=1, pipe=1),
        data=DataConfig(seq_len=40, microbatches=2, max_images=2, max_audio_clips=0, max_video_clips=2))


def test_lmm_loss_and_gradients_under_blockwise_equal_xla(monkeypatch):
    """Tiles of 8 over the 40-token sequence and the 16 patches; the dit's cross-attention
    reads its condition mask as segments."""
    monkeypatch.setattr(A, "BLOCK", 8)
    cfg = _lmm_config("xla")
    batch = PackedBatches(cfg)(1).arrays
    out = {}
    for name in ("xla", "blockwise"):
        model = LMM(_lmm_config(name).model, nnx.Rngs(0))
        graphdef = nnx.graphdef(model)
        out[name] = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(batch), has_aux=True))(
            nnx.state(model))
    (loss, aux), grads = out["blockwise"]
    (ref_loss, ref_aux), ref_grads = out["xla"]
    assert set(aux) == {"lm_loss", "dit_loss"}
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for name in aux:
        np.testing.assert_allclose(float(aux[name]), float(ref_aux[name]), rtol=1e-5)
    _close(grads, ref_grads, rtol=1e-4, atol=1e-6)
