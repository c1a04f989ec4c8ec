"""Shared transformer layers: RMSNorm, RoPE, GQA attention, SwiGLU, pre-norm block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax.config import BlockConfig

NEG_INF = -1e30


def linear(d_in: int, d_out: int, rngs: nnx.Rngs, bias: bool = False, scale: float = 1.0) -> nnx.Linear:
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=init, rngs=rngs)


def rope(x, positions, theta: float):
    """Rotary embedding over the last axis. x: [..., S, H, hd], positions: [..., S]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions[..., :, None, None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(ang), jnp.cos(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_mask(segment_ids, causal: bool):
    """[..., S] segment ids (0 = padding) -> bool [..., 1, S, S] (query, key)."""
    same = segment_ids[..., :, None] == segment_ids[..., None, :]
    if causal:
        s = segment_ids.shape[-1]
        same = same & jnp.tril(jnp.ones((s, s), bool))
    return same[..., None, :, :]


class Attention(nnx.Module):
    """Grouped-query attention; keys/values may come from another sequence (cross-attention)."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.q = linear(d, h * hd, rngs)
        self.k = linear(d, kv * hd, rngs)
        self.v = linear(d, kv * hd, rngs)
        self.o = linear(h * hd, d, rngs)

    def __call__(self, x, kv=None, mask=None, positions=None, theta: float = 10000.0):
        kv = x if kv is None else kv
        q = self.q(x).reshape(*x.shape[:-1], self.heads, self.head_dim)
        k = self.k(kv).reshape(*kv.shape[:-1], self.kv_heads, self.head_dim)
        v = self.v(kv).reshape(*kv.shape[:-1], self.kv_heads, self.head_dim)
        if positions is not None:
            q, k = rope(q, positions, theta), rope(k, positions, theta)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=-2), jnp.repeat(v, rep, axis=-2)
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(jnp.float32(self.head_dim))
        if mask is not None:
            logits = jnp.where(mask, logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
        return self.o(out.reshape(*x.shape[:-1], self.heads * self.head_dim))


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.gate = linear(dim, hidden, rngs)
        self.up = linear(dim, hidden, rngs)
        self.down = linear(hidden, dim, rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm transformer block used by the ViT, the audio encoder and the llm."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, rngs)

    def __call__(self, x, mask=None, positions=None, theta: float = 10000.0):
        x = x + self.attn(self.attn_norm(x), mask=mask, positions=positions, theta=theta)
        return x + self.mlp(self.mlp_norm(x))


class Projector(nnx.Module):
    """Encoder output -> llm width (two-layer GELU MLP, biases)."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs):
        self.fc1 = linear(d_in, d_out, rngs, bias=True)
        self.fc2 = linear(d_out, d_out, rngs, bias=True)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))
