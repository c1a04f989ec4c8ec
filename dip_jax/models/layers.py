"""Shared transformer layers: RMSNorm, RoPE, GQA attention, SwiGLU, pre-norm block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax.config import BlockConfig


def linear(d_in: int, d_out: int, rngs: nnx.Rngs, bias: bool = False, scale: float = 1.0,
           dtype=jnp.float32) -> nnx.Linear:
    """`dtype`: what the matmul runs in and returns; the parameters stay float32 (the master copy)."""
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=init, dtype=dtype, param_dtype=jnp.float32,
                      rngs=rngs)


def rms_norm(dim: int, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.RMSNorm:
    """Statistics in float32 whatever `dtype` (flax promotes them); the output in `dtype`."""
    return nnx.RMSNorm(dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def rope(x, positions, theta: float):
    """Rotary embedding over the last axis. x: [..., S, H, hd], positions: [..., S]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions[..., :, None, None].astype(jnp.float32) * freq
    # angles in float32: positions reach thousands, where bf16 could not tell neighbours apart
    sin, cos = jnp.sin(ang).astype(x.dtype), jnp.cos(ang).astype(x.dtype)
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

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        d, h, kv, hd = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.q = linear(d, h * hd, rngs, dtype=dtype)
        self.k = linear(d, kv * hd, rngs, dtype=dtype)
        self.v = linear(d, kv * hd, rngs, dtype=dtype)
        self.o = linear(h * hd, d, rngs, dtype=dtype)

    def __call__(self, x, kv=None, mask=None, positions=None, theta: float = 10000.0):
        # head counts follow the projections' widths, so a device holding a share of the heads
        # runs the same code on its share
        kv = x if kv is None else kv
        q = self.q(x).reshape(*x.shape[:-1], -1, self.head_dim)
        k = self.k(kv).reshape(*kv.shape[:-1], -1, self.head_dim)
        v = self.v(kv).reshape(*kv.shape[:-1], -1, self.head_dim)
        if positions is not None:
            q, k = rope(q, positions, theta), rope(k, positions, theta)
        lead = q.shape[:-3]
        flat = lambda t: t.reshape(-1, *t.shape[-3:])
        # K/V keep their kv_heads (grouped-query attention natively); the softmax runs in float32
        # whatever the compute dtype. A row of `mask` must keep at least one key: a fully masked
        # row is averaged uniformly by XLA but is undefined in fused kernels.
        out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=_flat_mask(mask, lead))
        return self.o(out.reshape(*x.shape[:-1], -1))


def _flat_mask(mask, lead):
    """A bool mask broadcastable to [*lead, heads, q, k] -> [B or 1, heads or 1, q, k]."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (len(lead) + 3 - mask.ndim) + mask.shape)
    tail = mask.shape[-3:]
    if all(n == 1 for n in mask.shape[:-3]):
        return mask.reshape(1, *tail)
    return jnp.broadcast_to(mask, (*lead, *tail)).reshape(-1, *tail)


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate = linear(dim, hidden, rngs, dtype=dtype)
        self.up = linear(dim, hidden, rngs, dtype=dtype)
        self.down = linear(hidden, dim, rngs, dtype=dtype)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm transformer block used by the ViT, the audio encoder and the llm."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attn_norm = rms_norm(cfg.dim, rngs, dtype)
        self.attn = Attention(cfg, rngs, dtype)
        self.mlp_norm = rms_norm(cfg.dim, rngs, dtype)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, rngs, dtype)

    def __call__(self, x, mask=None, positions=None, theta: float = 10000.0):
        x = x + self.attn(self.attn_norm(x), mask=mask, positions=positions, theta=theta)
        return x + self.mlp(self.mlp_norm(x))


class Projector(nnx.Module):
    """Encoder output -> llm width (two-layer GELU MLP, biases)."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = linear(d_in, d_out, rngs, bias=True, dtype=dtype)
        self.fc2 = linear(d_out, d_out, rngs, bias=True, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))
