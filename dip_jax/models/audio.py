"""Audio encoder: a two-conv stem subsampling log-mel-like frames, transformer, projector."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dip_jax.config import AudioConfig
from dip_jax.models.layers import ACTIVATIONS, Block, Projector, norm
from dip_jax.models.stack import ChunkedModule, make_stack


class AudioEncoder(ChunkedModule):
    def __init__(self, cfg: AudioConfig, out_dim: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention: str = "xla"):
        self.cfg, self.dtype = cfg, dtype
        k = cfg.conv_kernel
        pad = "SAME" if cfg.conv_padding == "same" else [(k // 2, k // 2)]
        conv = dict(padding=pad, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = nnx.Conv(cfg.mel_bins, cfg.dim, (k,), strides=(cfg.conv_strides[0],), **conv)
        self.conv2 = nnx.Conv(cfg.dim, cfg.dim, (k,), strides=(cfg.conv_strides[1],), **conv)
        self.pos = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (cfg.tokens_per_clip, cfg.dim)))
        self.blocks = make_stack(lambda r: Block(cfg, r, dtype, attention), cfg.layers, rngs)
        self.norm = norm(cfg, rngs, dtype)
        self.projector = Projector(cfg.dim, out_dim, rngs, dtype)

    def embed(self, frames):
        """frames: [N, frames_per_clip, mel_bins] -> [N, tokens_per_clip, dim]."""
        act = ACTIVATIONS[self.cfg.conv_act]
        x = act(self.conv1(frames))
        return act(self.conv2(x)) + self.pos[...].astype(self.dtype)

    def step(self, block, x, ctx):
        return block(x)

    def features(self, x):
        """The encoder's output (transformers' last_hidden_state)."""
        return self.norm(x)

    def head(self, x):
        return self.projector(self.features(x))
