"""Audio encoder: 4x conv subsampling over log-mel-like frames, transformer, projector."""
from __future__ import annotations

import jax
from flax import nnx

from dip_jax.config import AudioConfig
from dip_jax.models.layers import Block, Projector
from dip_jax.models.stack import ChunkedModule, make_stack


class AudioEncoder(ChunkedModule):
    def __init__(self, cfg: AudioConfig, out_dim: int, rngs: nnx.Rngs):
        self.cfg = cfg
        k = cfg.conv_kernel
        self.conv1 = nnx.Conv(cfg.mel_bins, cfg.dim, (k,), strides=(2,), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(cfg.dim, cfg.dim, (k,), strides=(2,), padding="SAME", rngs=rngs)
        self.pos = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (cfg.tokens_per_clip, cfg.dim)))
        self.blocks = make_stack(lambda r: Block(cfg, r), cfg.layers, rngs)
        self.norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.projector = Projector(cfg.dim, out_dim, rngs)

    def embed(self, frames):
        """frames: [N, frames_per_clip, mel_bins] -> [N, tokens_per_clip, dim]."""
        x = jax.nn.gelu(self.conv1(frames))
        return jax.nn.gelu(self.conv2(x)) + self.pos[...]

    def step(self, block, x, ctx):
        return block(x)

    def head(self, x):
        return self.projector(self.norm(x))
