"""Bring your own module: a video encoder dip_jax does not ship, pipelined with DIP.

Everything the library needs to know about the new module type is in this file:

1. the model: a Flax NNX module in the chunked protocol (`embed` -> `blocks` -> `head`);
   frames -> tubelet patch tokens -> transformer blocks -> a projector into the llm's width;
2. its config: a frozen dataclass (a `BlockConfig`, so the cost model knows its blocks);
3. its spec, in two halves: the planner's (`ModuleSpec`: role, item count from a new metadata
   field, tokens per item, parameter formulas, how its inputs are collated) and the runtime's
   (`ModuleRuntime`: how to build it and what one chunk's input looks like);
4. `specs.register(...)`, then a model config names it in `ModelConfig.extra_modules`.

The library's llm is the backbone; each sample's video clips are encoded and their tokens
replace the sample's VIDEO placeholder tokens. `main()` plans every batch with DIP, checks
the pipelined loss and gradients against `jax.value_and_grad` of the unpipelined model, and
trains a few steps from a plain Python loop.

    python examples/own_encoder.py                      # 8 fake CPU devices, data=2 x pipe=2
    python -m dip_jax.plan --config examples/own_encoder.py --metadata examples/own_encoder.jsonl
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dip_jax import specs
from dip_jax.config import (BlockConfig, ConfigError, DataConfig, LLMConfig, MeshConfig, ModelConfig, OptimConfig,
                            PipelineConfig, TrainConfig, projector_params)
from dip_jax.data.collate import collate
from dip_jax.data.metadata import BOS, EOS, WORD0, Sample, SampleMeta
from dip_jax.data.packing import Budget, pack_greedy
from dip_jax.models.layers import Block, Projector, linear, rms_norm
from dip_jax.models.lmm import LMM
from dip_jax.models.stack import ChunkedModule, make_stack
from dip_jax.plan.schedulers import PlanContext
from dip_jax.runtime.mesh import configure_host_devices, make_mesh
from dip_jax.runtime.pipeline import PipelineExecutor
from dip_jax.specs.runtime import ModuleRuntime
from dip_jax.train.planning import plan_batch, reorder
from dip_jax.train.state import create_state

VIDEO = 30                  # the placeholder token id: a token this example's text never uses
FRAMES = "video_frames"     # the new metadata field: frames of video a sample brings


# -- 1. the model ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoConfig(BlockConfig):
    frames_per_clip: int = 4
    frame_size: int = 8
    channels: int = 1
    tubelet: int = 2         # frames per patch token
    patch: int = 4           # pixels per side of a patch token
    max_clips: int = 2       # clip slots per microbatch

    def check(self, prefix: str) -> None:
        self._check(prefix)
        for name, n, d in (("tubelet", self.frames_per_clip, self.tubelet), ("patch", self.frame_size, self.patch)):
            if n % d:
                raise ConfigError(f"{prefix}.{name}: {d} does not divide {n}")

    @property
    def tokens_per_clip(self) -> int:
        return (self.frames_per_clip // self.tubelet) * (self.frame_size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.tubelet * self.patch ** 2 * self.channels


def tubelets(clips, t: int, p: int):
    """[N, F, H, W, C] -> [N, (F/t)(H/p)(W/p), t*p*p*C]: non-overlapping space-time patches."""
    n, f, h, w, c = clips.shape
    x = clips.reshape(n, f // t, t, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, (f // t) * (h // p) * (w // p), t * p * p * c)


class VideoEncoder(ChunkedModule):
    def __init__(self, cfg: VideoConfig, out_dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        self.patch_embed = linear(cfg.patch_dim, cfg.dim, rngs, bias=True, dtype=dtype)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.tokens_per_clip, cfg.dim)))
        self.blocks = make_stack(lambda r: Block(cfg, r, dtype), cfg.layers, rngs)
        self.norm = rms_norm(cfg.dim, rngs, dtype)
        self.projector = Projector(cfg.dim, out_dim, rngs, dtype)

    def embed(self, clips):
        return self.patch_embed(tubelets(clips, self.cfg.tubelet, self.cfg.patch)) + self.pos[...].astype(self.dtype)

    def step(self, block, x, ctx):
        return block(x)

    def head(self, x):
        return self.projector(self.norm(x))


# -- 2. its spec: the planner half (pure Python) and the runtime half -------------------------
def _clip_shape(cfg: VideoConfig) -> tuple[int, ...]:
    return (cfg.frames_per_clip, cfg.frame_size, cfg.frame_size, cfg.channels)


RUNTIME = ModuleRuntime(
    build=lambda model_cfg, cfg, d, rngs, dtype: VideoEncoder(cfg, d, rngs, dtype),
    example_input=lambda model_cfg, units, seq_len, make: make((units, *_clip_shape(model_cfg.module("video"))),
                                                               jnp.float32))

SPEC = specs.register(specs.ModuleSpec(
    "video", specs.ENCODER, RUNTIME,
    items=lambda meta, cfg: specs.clips(meta.get(FRAMES), cfg.frames_per_clip),
    capacity=lambda data, cfg: cfg.max_clips,
    tokens_per_item=lambda cfg: cfg.tokens_per_clip,
    layer_tokens=lambda cfg, seq_len: cfg.tokens_per_clip,
    metadata=(FRAMES,),
    embed_params=lambda cfg, d: cfg.patch_dim * cfg.dim + cfg.dim + cfg.tokens_per_clip * cfg.dim,
    head_params=lambda cfg, d: cfg.dim + projector_params(cfg.dim, d),
    encoder_items=specs.EncoderItems("video_clips", "video_pos", VIDEO, "video_clips", _clip_shape),
    color="#d65f5f"))


# -- 3. a config that composes it with the library's llm -------------------------------------
def get_config(data: int = 2, pipe: int = 2) -> TrainConfig:
    blk = dict(dim=32, mlp_hidden=64, heads=4, kv_heads=2)
    return TrainConfig(
        model=ModelConfig(name="own_encoder", vision=None, audio=None,
                          llm=LLMConfig(layers=4, vocab_size=64, **blk),
                          extra_modules=(("video", VideoConfig(layers=4, **blk)),)),
        mesh=MeshConfig(data=data, pipe=pipe),
        pipeline=PipelineConfig(schedule="dip", hardware="cpu", search_rollouts=8),
        data=DataConfig(seq_len=64, microbatches=4 * data),
        optim=OptimConfig(lr=3e-3))


# -- 4. data: samples with video clips and their metadata -------------------------------------
def make_samples(cfg: TrainConfig, n: int, seed: int = 0) -> list[Sample]:
    """Text around a sample's clips; the token after the clips says how bright they are, so
    the model has to look at them."""
    v = cfg.model.module("video")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = int(rng.integers(0, v.max_clips * v.frames_per_clip + 1))
        k = specs.clips(frames, v.frames_per_clip)
        level = rng.uniform(-1, 1)
        video = np.zeros((k, *_clip_shape(v)), np.float32)
        video.reshape(-1, *_clip_shape(v)[1:])[:frames] = level + 0.1 * rng.standard_normal(
            (frames, *_clip_shape(v)[1:]))
        words = rng.integers(WORD0 + 4, cfg.model.llm.vocab_size, int(rng.integers(3, 12)))
        answer = WORD0 + int((level + 1) * 2) if k else WORD0 + 3
        tokens = np.array([BOS, *[VIDEO] * (k * v.tokens_per_clip), answer, *words, EOS], np.int32)
        labels = tokens != VIDEO
        meta = SampleMeta(text_tokens=int(labels.sum()), extra=((FRAMES, frames),))
        out.append(Sample(tokens, labels, meta, sample_id=i, extra={"video_clips": video}))
    return out


def batches(cfg: TrainConfig, samples: list[Sample]):
    """Pack samples into microbatches (as the trainer packs) and collate each batch:
    yields (arrays, metadata per microbatch)."""
    budget, M, start = Budget.from_config(cfg), cfg.data.microbatches, 0
    while True:
        mbs, used = pack_greedy([s.meta for s in samples[start:]], budget, M)
        if len(mbs) < M:
            return
        micro = [[samples[start + j] for j in mb] for mb in mbs]
        yield collate(micro, cfg, seed=0), tuple(tuple(s.meta for s in mb) for mb in micro)
        start += used


# -- 5. the user's loop ---------------------------------------------------------------------
def pipelined(cfg: TrainConfig, tx=None, probe=None):
    """(model, plan context, executor) for `cfg` on this process's devices."""
    model = LMM(cfg.model, nnx.Rngs(0))
    ctx = PlanContext(cfg, probe_batches=probe)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.pipe)
    ex = PipelineExecutor(model, ctx.partition, mesh, specs.max_items(cfg.model, cfg.data), cfg.data.seq_len, tx=tx,
                          shard_state_over_data=cfg.optim.shard_state_over_data)   # as create_state lays it out
    return model, ctx, ex


def check_equivalence(cfg: TrainConfig, samples, steps: int = 2, rtol: float = 1e-5, atol: float = 1e-6):
    """Pipelined (DIP plans) vs unpipelined loss and gradients on the same parameters.
    Returns the largest gradient error seen, relative to its leaf's largest gradient."""
    data = list(batches(cfg, samples))[:steps]
    model, ctx, ex = pipelined(cfg, probe=[md for _, md in data[:2]])
    graphdef, params = nnx.split(model)
    reference = jax.jit(jax.value_and_grad(lambda p, a: nnx.merge(graphdef, p)(a)[0]))
    worst = 0.0
    for step, (arrays, metadata) in enumerate(data):
        order, replicas = plan_batch(ctx, step, metadata, "dip")
        arrays = reorder(arrays, order)
        loss, grads = ex.value_and_grad(params, arrays, [r.plan for r in replicas])
        ref_loss, ref_grads = reference(params, arrays)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=rtol)
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=atol,
                                       err_msg=jax.tree_util.keystr(path))
            worst = max(worst, float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), atol)))
    return worst


def train(cfg: TrainConfig, samples, steps: int):
    """A few optimizer steps, each batch planned by DIP: returns the losses."""
    tx = optax.adam(cfg.optim.lr)
    data = list(batches(cfg, samples))
    _, ctx, ex = pipelined(cfg, tx, probe=[md for _, md in data[:2]])
    state = create_state(cfg, tx, ex.mesh, ex.layouts)          # stage layout, split over 'pipe'
    losses = []
    for step in range(steps):
        arrays, metadata = data[step % len(data)]
        order, replicas = plan_batch(ctx, step, metadata, "dip")
        state, metrics = ex.train_step(state, reorder(arrays, order), [r.plan for r in replicas])
        losses.append(float(metrics["loss"]))
    return losses


def main() -> None:
    configure_host_devices()          # 8 CPU devices when there is no accelerator
    cfg = get_config()
    samples = make_samples(cfg, 400)
    print(f"modules {cfg.model.modules}; largest gradient error "
          f"{check_equivalence(cfg, samples):.2e} (pipelined vs unpipelined, DIP plans)")
    losses = train(cfg, samples, steps=30)
    print("loss", " ".join(f"{x:.3f}" for x in losses[::5]), f"... {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
