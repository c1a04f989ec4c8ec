"""Mixed precision (`model.compute_dtype`) and the fused attention.

Attention through jax.nn.dot_product_attention must equal the score-matrix formulation it
replaced (fp32, causal + segment masks, GQA, cross-attention), with a wrong-mask negative
control. A bf16 model keeps float32 parameters and losses, carries bf16 activations, and gives
the fp32 loss to ~1e-2; every scheduler gives the unpipelined bf16 loss and gradients. The cost
model counts half the activation bytes in bf16.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dip_jax.config import (AudioConfig, BlockConfig, ConfigError, DataConfig, DiTConfig, LLMConfig, MeshConfig,
                            ModelConfig, TrainConfig, VisionConfig)
from dip_jax.data.pipeline import PackedBatches
from dip_jax.models.dit import DiT
from dip_jax.models.layers import Attention, attention_mask, rope
from dip_jax.models.lmm import LMM
from dip_jax.models.stack import slice_layers
from dip_jax.plan import tables as T
from dip_jax.plan.baselines import BASELINES, schedule_baseline
from dip_jax.plan.cost import CostModel
from dip_jax.plan.hardware import load
from dip_jax.plan.partition import ModalityPartition, split_layers
from dip_jax.plan.schedule import ModuleChunks
from dip_jax.plan.search import search
from dip_jax.plan.simulate import Costs
from dip_jax.plan.workload import workload_from_metadata
from dip_jax.runtime.mesh import make_mesh
from dip_jax.runtime.pipeline import PipelineExecutor
from dip_jax.config.zoo import paper_config

BF16, F32 = jnp.dtype("bfloat16"), jnp.dtype("float32")


# -- attention -----------------------------------------------------------------------------

def reference_attention(attn: Attention, x, kv=None, mask=None, positions=None, theta=10000.0):
    """The explicit formulation: K/V heads repeated, masked logits, softmax, weighted sum."""
    kv = x if kv is None else kv
    q = attn.q(x).reshape(*x.shape[:-1], attn.heads, attn.head_dim)
    k = attn.k(kv).reshape(*kv.shape[:-1], attn.kv_heads, attn.head_dim)
    v = attn.v(kv).reshape(*kv.shape[:-1], attn.kv_heads, attn.head_dim)
    if positions is not None:
        q, k = rope(q, positions, theta), rope(k, positions, theta)
    rep = attn.heads // attn.kv_heads
    k, v = jnp.repeat(k, rep, axis=-2), jnp.repeat(v, rep, axis=-2)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(jnp.float32(attn.head_dim))
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    out = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v)
    return attn.o(out.reshape(*x.shape[:-1], attn.heads * attn.head_dim))


def _segments(shape, rng):
    """Random packed segments (ids 1, 2, ... then 0-padding) and their per-segment positions."""
    seg = np.zeros(shape, np.int32)
    pos = np.zeros(shape, np.int32)
    for idx in np.ndindex(*shape[:-1]):
        cuts = np.sort(rng.choice(np.arange(1, shape[-1]), 3, replace=False))
        for s, (a, b) in enumerate(zip((0, *cuts[:-1]), cuts), start=1):
            seg[idx][a:b] = s
            pos[idx][a:b] = np.arange(b - a)
    return jnp.asarray(seg), jnp.asarray(pos)


def _case(name):
    """(attention module, call kwargs, a wrong mask for the negative control)."""
    rng = np.random.default_rng(1)
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    if name == "causal_segments_gqa":           # the llm: heads 4 over 2 kv heads, RoPE
        attn = Attention(BlockConfig(dim=32, heads=4, kv_heads=2), nnx.Rngs(0))
        seg, pos = _segments((2, 12), rng)
        kw = dict(x=x(2, 12, 32), mask=attention_mask(seg, causal=True), positions=pos)
        return attn, kw, attention_mask(seg, causal=False)
    if name == "mqa_extra_leading_dims":        # [2, 3, T, D] inputs, one kv head, bidirectional
        attn = Attention(BlockConfig(dim=32, heads=4, kv_heads=1), nnx.Rngs(1))
        seg, _ = _segments((2, 3, 10), rng)
        kw = dict(x=x(2, 3, 10, 32), mask=attention_mask(seg, causal=False))
        return attn, kw, attention_mask(jnp.ones_like(seg), causal=False)
    # the dit's cross-attention: queries over condition tokens, a per-clip key mask
    attn = Attention(BlockConfig(dim=32, heads=4, kv_heads=2), nnx.Rngs(2))
    cond_mask = jnp.asarray([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5])
    kw = dict(x=x(3, 8, 32), kv=x(3, 6, 32), mask=cond_mask[:, None, None, :])
    return attn, kw, jnp.ones((3, 1, 1, 6), bool)


CASES = ("causal_segments_gqa", "mqa_extra_leading_dims", "cross_attention")


@pytest.mark.parametrize("name", CASES)
def test_fused_attention_equals_the_explicit_formulation(name):
    attn, kw, wrong = _case(name)
    fused, ref = attn(**kw), reference_attention(attn, **kw)
    assert fused.dtype == ref.dtype == F32 and fused.shape == kw["x"].shape
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # negative control: the same inputs under a wrong mask (no causality / no segments / no key mask)
    assert np.max(np.abs(np.asarray(reference_attention(attn, **dict(kw, mask=wrong)) - fused))) > 1e-2


def test_fused_attention_gradients_equal_the_explicit_formulation():
    attn, kw, _ = _case("causal_segments_gqa")
    graphdef, params = nnx.split(attn)
    grad = lambda f: jax.grad(lambda p, x: jnp.sum(jnp.sin(f(nnx.merge(graphdef, p), x))), argnums=(0, 1))
    rest = {k: v for k, v in kw.items() if k != "x"}
    got = grad(lambda a, x: a(x, **rest))(params, kw["x"])
    ref = grad(lambda a, x: reference_attention(a, x, **rest))(params, kw["x"])
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


# -- a bf16 model, unpipelined -------------------------------------------------------------

BLK = dict(dim=16, mlp_hidden=32, heads=2, kv_heads=1)


def _config(dtype: str, dit: bool = True) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            vision=VisionConfig(layers=4, image_size=8, patch_size=4, channels=1, spatial_merge=1, **BLK),
            audio=AudioConfig(layers=4, mel_bins=8, frames_per_second=16, **BLK),
            llm=LLMConfig(layers=4, vocab_size=64, **BLK),
            dit=DiTConfig(layers=4, latent_channels=4, latent_frames_per_second=2, tokens_per_frame=2,
                          cond_tokens=6, time_embed_dim=16, **BLK) if dit else None,
            compute_dtype=dtype),
        mesh=MeshConfig(data=1, pipe=4),
        data=DataConfig(seq_len=32, microbatches=4, max_images=4, max_audio_clips=2,
                        max_video_clips=2 if dit else 0))


def _value_and_grad(model, batch):
    graphdef = nnx.graphdef(model)
    return jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(batch)[0]))(nnx.state(model))


@pytest.fixture(scope="module")
def models():
    """The same parameters (one seed) built as an fp32 and a bf16 model, on one batch, with the
    fp32 loss and the bf16 (loss, aux) and gradients."""
    f32, bf16 = _config("float32"), _config("bfloat16")
    batch = PackedBatches(f32)(1).arrays
    m32, m16 = LMM(f32.model, nnx.Rngs(0)), LMM(bf16.model, nnx.Rngs(0))
    forward = lambda m: jax.jit(lambda p: nnx.merge(nnx.graphdef(m), p)(batch))(nnx.state(m))
    graphdef = nnx.graphdef(m16)      # the bf16 loss, its aux and gradients from one program
    out_bf16, grads_bf16 = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(batch), has_aux=True))(
        nnx.state(m16))
    return {"f32": m32, "bf16": m16, "batch": batch, "loss_f32": forward(m32)[0], "out_bf16": out_bf16,
            "grads_bf16": grads_bf16}


def test_bf16_model_keeps_float32_parameters(models):
    p32, p16 = (jax.tree.leaves(nnx.state(models[k], nnx.Param)) for k in ("f32", "bf16"))
    assert {p.dtype for p in p16} == {F32}
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(p32, p16))


def _module_inputs(model, batch):
    """Per module: its raw inputs as the unpipelined model feeds them (microbatch 0)."""
    b = jax.tree.map(lambda a: a[0] if getattr(a, "ndim", 0) else a, batch)
    hidden = jnp.zeros((1, b["tokens"].shape[0], model.cfg.llm.dim), jnp.dtype(model.cfg.compute_dtype))
    return {"vision": b["images"], "audio": b["audio"],
            "llm": {"tokens": b["tokens"][None], "segment_ids": b["segment_ids"][None],
                    "positions": b["positions"][None]},
            "dit": {"x_t": b["latents"], "t": b["t"], "cond": hidden[0][b["cond_idx"]],
                    "cond_mask": b["cond_mask"]}}


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_embed_step_and_head_run_in_the_compute_dtype(models, dtype):
    model, want = models[dtype], BF16 if dtype == "bf16" else F32
    for name, inputs in _module_inputs(model, models["batch"]).items():
        module = getattr(model, name)

        def embed_step_head():
            ctx, x = module.context(inputs), module.embed(inputs)
            y = module.run_blocks(slice_layers(module.layer_params(), 0, 1), x, ctx)   # one step
            return x, y, module.head(y)
        x, y, out = jax.eval_shape(embed_step_head)
        for what, tree in (("embed", x), ("step", y), ("head", out)):
            assert {a.dtype for a in jax.tree.leaves(tree)} == {want}, (name, what)


def test_bf16_loss_is_float32_and_close_to_the_fp32_loss(models):
    (l16, aux16), l32 = models["out_bf16"], models["loss_f32"]
    assert l16.dtype == F32 and {v.dtype for v in aux16.values()} == {F32}
    assert bool(jnp.isfinite(l16)) and set(aux16) == {"lm_loss", "dit_loss"}
    assert float(l16) != float(l32)                      # bf16 really ran
    np.testing.assert_allclose(float(l16), float(l32), rtol=1e-2)
    grads = models["grads_bf16"]
    assert not models["batch"]["cond_mask"].any(-1).all()   # padding clip slots are part of this batch
    assert {g.dtype for g in jax.tree.leaves(grads)} == {F32}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_empty_clip_slots_give_finite_dit_outputs_and_gradients(models):
    """A padding clip (all-False cond_mask) must not poison the gradients of the real ones."""
    dit = models["f32"].dit
    cfg = dit.cfg
    graphdef, params = nnx.split(dit)
    r = np.random.default_rng(0)
    inputs = {"x_t": jnp.asarray(r.standard_normal((2, cfg.tokens_per_clip, cfg.latent_channels)), jnp.float32),
              "t": jnp.asarray([0.3, 0.7], jnp.float32),
              "cond": jnp.asarray(r.standard_normal((2, cfg.cond_tokens, models["f32"].cfg.llm.dim)), jnp.float32),
              "cond_mask": jnp.asarray([[True] * 4 + [False] * (cfg.cond_tokens - 4), [False] * cfg.cond_tokens])}
    assert bool(jnp.all(jnp.any(DiT.context(None, inputs)["cond_mask"], axis=-1)))   # no fully masked row
    valid = jnp.asarray([1.0, 0.0])

    @jax.jit
    def run(p, c):
        out = nnx.merge(graphdef, p)(dict(inputs, cond=c))
        loss = lambda p, c: jnp.sum(jnp.mean(nnx.merge(graphdef, p)(dict(inputs, cond=c)) ** 2, (1, 2)) * valid)
        return out, jax.grad(loss, argnums=(0, 1))(p, c)
    out, (g_params, g_cond) = run(params, inputs["cond"])
    assert bool(jnp.all(jnp.isfinite(out)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_params))
    assert bool(jnp.all(g_cond[1] == 0)) and bool(jnp.any(g_cond[0] != 0))


# -- config and cost model -----------------------------------------------------------------

def test_unknown_compute_dtype_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.compute_dtype"):
        TrainConfig(model=ModelConfig(compute_dtype="float16"))
    with pytest.raises(ConfigError, match=r"model\.compute_dtype"):
        ModelConfig(compute_dtype="float16").check()


def test_cost_model_bytes_follow_the_compute_dtype():
    hw = load("h800")
    bf16 = paper_config("vlm_s")
    assert bf16.model.compute_dtype == "bfloat16"      # what the paper's plans assume
    f32 = dataclasses.replace(bf16.model, compute_dtype="float32")
    c16, c32 = CostModel(bf16.model, hw, 4, 8192), CostModel(f32, hw, 4, 8192)
    for module in ("vision", "llm"):
        assert c32.boundary_bytes(module, 2) == 2 * c16.boundary_bytes(module, 2)
        assert c32.layer_work(module, 2).bytes == 2 * c16.layer_work(module, 2).bytes
        assert c32.stored_bytes(module, 3, 2, "store") == 2 * c16.stored_bytes(module, 3, 2, "store")
        assert c32.working_bytes(module, 3, 2) == 2 * c16.working_bytes(module, 3, 2)
        assert c32.param_bytes(1e9) == c16.param_bytes(1e9)   # fp32 master state either way
        assert c32.p2p_seconds(module, 2) > c16.p2p_seconds(module, 2)


# -- every scheduler in bf16 ---------------------------------------------------------------

UNIT = {"vision": 2, "audio": 1, "llm": 1}
UNIT_COSTS = Costs(latency=lambda op: 1.0 if op.kind == "F" else 2.0)


class PipelinedBF16:
    """The tests/test_executor.py setup, smaller and in bf16: vision + audio + llm, pipe=4."""

    def __init__(self):
        self.cfg = _config("bfloat16", dit=False)
        self.model = LMM(self.cfg.model, nnx.Rngs(0))
        self.params = nnx.state(self.model)
        self.batch = PackedBatches(self.cfg)(1)
        self.ref = _value_and_grad(self.model, self.batch.arrays)
        mods = self.cfg.model.modules
        self.partition = ModalityPartition(4, tuple(
            ModuleChunks(m, 4, split_layers(getattr(self.cfg.model, m).layers, 4), True, UNIT[m]) for m in mods))
        self.ex = PipelineExecutor(self.model, self.partition, make_mesh(1, 4), {"vision": 4, "audio": 2},
                                   self.cfg.data.seq_len)
        self.graph = self.partition.graph(workload_from_metadata(self.cfg, self.batch.metadata[:4]))
        self.buckets = {"stash": {m: 16 for m in mods}, "cot": {m: 8 for m in mods}, "boundary": 4, "cond": 4,
                        "t_max": T.bucket(len(self.graph.ops()), 8)}

    def run(self, plan):
        return self.ex.value_and_grad(self.params, self.batch.arrays, [plan], self.buckets)


@pytest.fixture(scope="module")
def pipelined():
    return PipelinedBF16()


def _assert_close_bf16(loss, grads, ref, tol=1e-2):
    """Loss relative; each gradient leaf relative to its own scale (its norm)."""
    ref_loss, ref_grads = ref
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.linalg.norm(g - r) <= tol * np.linalg.norm(r), jax.tree_util.keystr(path)


@pytest.mark.parametrize("scheduler", [*BASELINES, "dip"])
def test_every_scheduler_matches_the_unpipelined_bf16_model(pipelined, scheduler):
    assert pipelined.ex.spec.dtype == BF16                   # the pipeline carries bf16 activations
    plan = search(pipelined.graph, UNIT_COSTS, rollouts=4, seed=1)[0] if scheduler == "dip" else \
        schedule_baseline(scheduler, pipelined.graph, UNIT_COSTS)
    loss, grads = pipelined.run(plan)
    assert loss.dtype == F32 and {g.dtype for g in jax.tree.leaves(grads)} == {F32}
    _assert_close_bf16(loss, grads, pipelined.ref)
