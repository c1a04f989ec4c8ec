"""Analytic parameter counts shared by the specs' cost formulas and the model configs. They
mirror the Flax modules in dip_jax/models exactly (a test checks them against nnx.eval_shape)."""
from __future__ import annotations

from typing import Optional


def attention_params(dim: int, heads: int, kv_heads: int, kv_dim: Optional[int] = None,
                     qkv_bias: bool = False, out_bias: bool = False, k_bias: bool = True) -> int:
    head_dim = dim // heads
    kv_dim = dim if kv_dim is None else kv_dim
    biases = (heads + (1 + k_bias) * kv_heads) * head_dim * qkv_bias + dim * out_bias
    return dim * heads * head_dim + 2 * kv_dim * kv_heads * head_dim + heads * head_dim * dim + biases


def swiglu_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def mlp_params(dim: int, hidden: int, kind: str = "swiglu", bias: bool = False) -> int:
    """SwiGLU (gate, up, down) or a GELU-family MLP (up, down)."""
    if kind == "swiglu":
        return swiglu_params(dim, hidden) + (2 * hidden + dim) * bias
    return 2 * dim * hidden + (hidden + dim) * bias


def norm_params(dim: int, kind: str = "rms") -> int:
    """RMSNorm has a scale; LayerNorm a scale and a bias."""
    return dim * (2 if kind == "layer" else 1)


def projector_params(d_in: int, d_out: int) -> int:
    """Two-layer GELU MLP with biases (encoder -> llm width)."""
    return d_in * d_out + d_out + d_out * d_out + d_out
