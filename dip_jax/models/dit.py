"""Diffusion transformer over video latents, conditioned on llm hidden states (flow matching).

Noise and timesteps are inputs: they are drawn per global sample id outside the model, so any
execution order of the clips gives the same result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax.config import DiTConfig
from dip_jax.models.layers import Attention, linear, mlp, norm
from dip_jax.models.stack import ChunkedModule, make_stack


def _norm(x, eps: float = 1e-6):
    """Parameter-free RMS norm; its statistics in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def timestep_embedding(t, dim: int):
    half = dim // 2
    freq = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = 1000.0 * t[:, None].astype(jnp.float32) * freq
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


class DiTBlock(nnx.Module):
    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, dtype=jnp.float32, attention: str = "xla"):
        self.ada = linear(cfg.dim, 6 * cfg.dim, rngs, bias=True, scale=0.1, dtype=dtype)
        self.attn = Attention(cfg, rngs, dtype, attention)
        self.cross_norm = norm(cfg, rngs, dtype)
        self.cross = Attention(cfg, rngs, dtype, attention)
        self.mlp = mlp(cfg, rngs, dtype)

    def __call__(self, x, cond, temb, cond_mask):
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.ada(jax.nn.silu(temb))[:, None, :], 6, axis=-1)
        x = x + g1 * self.attn(_norm(x) * (1 + sc1) + sh1)
        # the condition mask as segments: every query in segment 1, a padded condition token in 0
        x = x + self.cross(self.cross_norm(x), kv=cond, segment_ids=jnp.ones(x.shape[:2], jnp.int32),
                           kv_segment_ids=cond_mask.astype(jnp.int32))
        return x + g2 * self.mlp(_norm(x) * (1 + sc2) + sh2)


class DiT(ChunkedModule):
    def __init__(self, cfg: DiTConfig, cond_dim: int, rngs: nnx.Rngs, dtype=jnp.float32, attention: str = "xla"):
        self.cfg, self.dtype = cfg, dtype
        d = cfg.dim
        self.latent_in = linear(cfg.latent_channels, d, rngs, bias=True, dtype=dtype)
        self.pos = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (cfg.tokens_per_clip, d)))
        self.time_fc1 = linear(cfg.time_embed_dim, d, rngs, bias=True, dtype=dtype)
        self.time_fc2 = linear(d, d, rngs, bias=True, dtype=dtype)
        self.cond_in = linear(cond_dim, d, rngs, bias=True, dtype=dtype)
        self.blocks = make_stack(lambda r: DiTBlock(cfg, r, dtype, attention), cfg.layers, rngs)
        self.final_ada = linear(d, 2 * d, rngs, bias=True, scale=0.1, dtype=dtype)
        self.latent_out = linear(d, cfg.latent_channels, rngs, bias=True, dtype=dtype)

    def context(self, inputs):
        """An empty clip slot (no caption: padding, its loss weighted 0) attends to all of its
        condition tokens, so that no attention row is fully masked."""
        mask = inputs["cond_mask"]
        return {"cond_mask": mask | ~jnp.any(mask, axis=-1, keepdims=True)}

    def embed(self, inputs):
        """inputs: x_t [N, T, C], t [N], cond [N, Lc, cond_dim] -> carry (x, cond, temb)."""
        x = self.latent_in(inputs["x_t"]) + self.pos[...].astype(self.dtype)
        # sin/cos in float32 (timesteps are scaled by 1000), then the compute dtype
        t_freq = timestep_embedding(inputs["t"], self.cfg.time_embed_dim).astype(self.dtype)
        temb = self.time_fc2(jax.nn.silu(self.time_fc1(t_freq)))
        return x, self.cond_in(inputs["cond"]), temb

    def step(self, block, carry, ctx):
        x, cond, temb = carry
        return block(x, cond, temb, ctx["cond_mask"]), cond, temb

    def head(self, carry):
        x, _, temb = carry
        shift, scale = jnp.split(self.final_ada(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        return self.latent_out(_norm(x) * (1 + scale) + shift)
