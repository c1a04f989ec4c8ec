"""Shared transformer layers: norms, RoPE, GQA attention, MLPs, the pre-norm block.

The block's family (norm type and epsilon, MLP type, biases) comes from its BlockConfig, so a
pretrained checkpoint's architecture is a choice of options, not a fork of the module.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax.config import BlockConfig
from dip_jax.models.attention import attention


def linear(d_in: int, d_out: int, rngs: nnx.Rngs, bias: bool = False, scale: float = 1.0,
           dtype=jnp.float32) -> nnx.Linear:
    """`dtype`: what the matmul runs in and returns; the parameters stay float32 (the master copy)."""
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=init, dtype=dtype, param_dtype=jnp.float32,
                      rngs=rngs)


def rms_norm(dim: int, rngs: nnx.Rngs, dtype=jnp.float32, eps: float = 1e-6) -> nnx.RMSNorm:
    """Statistics in float32 whatever `dtype` (flax promotes them); the output in `dtype`."""
    return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def norm(cfg: BlockConfig, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
    """The block family's norm (RMSNorm or LayerNorm) at its epsilon."""
    if cfg.norm == "layer":
        return nnx.LayerNorm(cfg.dim, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    return rms_norm(cfg.dim, rngs, dtype, cfg.norm_eps)


def rope_frequencies(half: int, theta: float, scaling: tuple = ()):
    """Inverse frequencies of the rotary embedding; `scaling` as Hugging Face writes rope_scaling
    (linear, llama3), as (key, value) pairs. Without scaling, the formula of the default block."""
    if not scaling:
        return theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))
    inv = [1.0 / theta ** (i / half) for i in range(half)]
    if kind == "linear":
        inv = [f / s["factor"] for f in inv]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = out
    return jnp.asarray(inv, jnp.float32)


def rope(x, positions, theta: float, scaling: tuple = ()):
    """Rotary embedding over the last axis (the two halves rotate together, as Hugging Face's
    Llama does). x: [..., S, H, hd], positions: [..., S]."""
    half = x.shape[-1] // 2
    freq = rope_frequencies(half, theta, scaling)
    ang = positions[..., :, None, None].astype(jnp.float32) * freq
    # angles in float32: positions reach thousands, where bf16 could not tell neighbours apart
    sin, cos = jnp.sin(ang).astype(x.dtype), jnp.cos(ang).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_mask(segment_ids, causal: bool):
    """[..., S] segment ids (0 = padding) -> bool [..., 1, S, S] (query, key): the dense form of
    what the models pass the attention backends as segment ids and a causal flag."""
    same = segment_ids[..., :, None] == segment_ids[..., None, :]
    if causal:
        s = segment_ids.shape[-1]
        same = same & jnp.tril(jnp.ones((s, s), bool))
    return same[..., None, :, :]


class Attention(nnx.Module):
    """Grouped-query attention; keys/values may come from another sequence (cross-attention).

    `attention`: the backend (model.attention; dip_jax/models/attention.py)."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, dtype=jnp.float32, attention: str = "xla"):
        d, h, kv, hd = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.attention = attention
        b = cfg.qkv_bias
        self.q = linear(d, h * hd, rngs, bias=b, dtype=dtype)
        self.k = linear(d, kv * hd, rngs, bias=b and cfg.k_bias, dtype=dtype)
        self.v = linear(d, kv * hd, rngs, bias=b, dtype=dtype)
        self.o = linear(h * hd, d, rngs, bias=cfg.out_bias, dtype=dtype)

    def __call__(self, x, kv=None, mask=None, positions=None, theta: float = 10000.0, scaling: tuple = (),
                 segment_ids=None, kv_segment_ids=None, causal: bool = False):
        """x [..., S, D], kv [..., T, D]. What a query sees: `segment_ids` [..., S] against
        `kv_segment_ids` [..., T] (self-attention: the same), and `causal`; or a dense bool
        `mask` broadcastable to [..., heads, S, T] (the xla backend only)."""
        # head counts follow the projections' widths, so a device holding a share of the heads
        # runs the same code on its share
        self_attention = kv is None
        kv = x if kv is None else kv
        q = self.q(x).reshape(*x.shape[:-1], -1, self.head_dim)
        k = self.k(kv).reshape(*kv.shape[:-1], -1, self.head_dim)
        v = self.v(kv).reshape(*kv.shape[:-1], -1, self.head_dim)
        if positions is not None:
            q, k = rope(q, positions, theta, scaling), rope(k, positions, theta, scaling)
        lead = q.shape[:-3]
        s, t = q.shape[-3], k.shape[-3]
        flat = lambda a: a.reshape(-1, *a.shape[-3:])
        if self_attention and kv_segment_ids is None:
            kv_segment_ids = segment_ids
        ids = lambda a, n: None if a is None else jnp.broadcast_to(a, (*lead, n)).reshape(-1, n)
        # K/V keep their kv_heads (grouped-query attention natively); the softmax runs in float32
        # whatever the compute dtype
        out = attention(flat(q), flat(k), flat(v), backend=self.attention, mask=_flat_mask(mask, lead),
                        q_segment_ids=ids(segment_ids, s), kv_segment_ids=ids(kv_segment_ids, t), causal=causal)
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
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=jnp.float32, bias: bool = False):
        self.gate = linear(dim, hidden, rngs, bias=bias, dtype=dtype)
        self.up = linear(dim, hidden, rngs, bias=bias, dtype=dtype)
        self.down = linear(hidden, dim, rngs, bias=bias, dtype=dtype)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class GeluMLP(nnx.Module):
    """up -> activation -> down (the ViT/CLIP/Whisper MLP); named like SwiGLU's linears so the
    tensor rules split it alike (up column-parallel, down row-parallel)."""

    def __init__(self, dim: int, hidden: int, kind: str, rngs: nnx.Rngs, dtype=jnp.float32, bias: bool = False):
        self.kind = kind
        self.up = linear(dim, hidden, rngs, bias=bias, dtype=dtype)
        self.down = linear(hidden, dim, rngs, bias=bias, dtype=dtype)

    def __call__(self, x):
        return self.down(ACTIVATIONS[self.kind](self.up(x)))


def mlp(cfg: BlockConfig, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.dim, cfg.mlp_hidden, rngs, dtype, cfg.mlp_bias)
    return GeluMLP(cfg.dim, cfg.mlp_hidden, cfg.mlp, rngs, dtype, cfg.mlp_bias)


class Block(nnx.Module):
    """Pre-norm transformer block used by the ViT, the audio encoder and the llm."""

    def __init__(self, cfg: BlockConfig, rngs: nnx.Rngs, dtype=jnp.float32, attention: str = "xla"):
        self.attn_norm = norm(cfg, rngs, dtype)
        self.attn = Attention(cfg, rngs, dtype, attention)
        self.mlp_norm = norm(cfg, rngs, dtype)
        self.mlp = mlp(cfg, rngs, dtype)

    def __call__(self, x, mask=None, positions=None, theta: float = 10000.0, scaling: tuple = (),
                 segment_ids=None, causal: bool = False):
        x = x + self.attn(self.attn_norm(x), mask=mask, positions=positions, theta=theta, scaling=scaling,
                          segment_ids=segment_ids, causal=causal)
        return x + self.mlp(self.mlp_norm(x))


class Projector(nnx.Module):
    """Encoder output -> llm width (two-layer GELU MLP, biases)."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = linear(d_in, d_out, rngs, bias=True, dtype=dtype)
        self.fc2 = linear(d_out, d_out, rngs, bias=True, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))
