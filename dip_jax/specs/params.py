"""Analytic parameter counts shared by the specs' cost formulas and the model configs. They
mirror the Flax modules in dip_jax/models exactly (a test checks them against nnx.eval_shape)."""
from __future__ import annotations

from typing import Optional


def attention_params(dim: int, heads: int, kv_heads: int, kv_dim: Optional[int] = None) -> int:
    head_dim = dim // heads
    kv_dim = dim if kv_dim is None else kv_dim
    return dim * heads * head_dim + 2 * kv_dim * kv_heads * head_dim + heads * head_dim * dim


def swiglu_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def projector_params(d_in: int, d_out: int) -> int:
    """Two-layer GELU MLP with biases (encoder -> llm width)."""
    return d_in * d_out + d_out + d_out * d_out + d_out
