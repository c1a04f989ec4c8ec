"""Causal llm backbone: token embedding (with encoder outputs merged in), RoPE blocks, LM head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax.config import LLMConfig
from dip_jax.models.layers import Block, linear, norm
from dip_jax.models.stack import ChunkedModule, make_stack


def merge_embeddings(embeds, values, positions):
    """Write `values` [N, K, D] at sequence `positions` [N, K] of `embeds` [N, S, D].

    Placeholder tokens are replaced by encoder outputs; positions >= S (padding) are dropped.
    """
    def one(e, v, p):
        return e.at[p].set(v.astype(e.dtype), mode="drop")

    return jax.vmap(one)(embeds, values, positions)


class LLM(ChunkedModule):
    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs, dtype=jnp.float32, attention: str = "xla"):
        self.cfg = cfg
        self.embedding = nnx.Embed(cfg.vocab_size, cfg.dim, embedding_init=nnx.initializers.normal(1.0),
                                   dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.blocks = make_stack(lambda r: Block(cfg, r, dtype, attention), cfg.layers, rngs)
        self.norm = norm(cfg, rngs, dtype)
        self.lm_head = None if cfg.tie_embeddings else linear(cfg.dim, cfg.vocab_size, rngs, dtype=dtype)

    def context(self, inputs):
        # segment ids, not a dense mask: the attention backend decides whether S x S is ever written
        return {"segment_ids": inputs["segment_ids"], "positions": inputs["positions"]}

    def embed(self, inputs):
        """inputs: tokens [N, S] plus optional (values [N, K, D], positions [N, K]) merges."""
        x = self.embedding(inputs["tokens"])
        for values, positions in inputs.get("merges", ()):
            x = merge_embeddings(x, values, positions)
        return x

    def step(self, block, x, ctx):
        return block(x, segment_ids=ctx["segment_ids"], causal=True, positions=ctx["positions"],
                     theta=self.cfg.rope_theta, scaling=self.cfg.rope_scaling)

    def head(self, x):
        """Returns (hidden, logits): the dit conditions on hidden states, the LM loss on logits."""
        h = self.norm(x)
        return h, (self.embedding.attend(h) if self.lm_head is None else self.lm_head(h))
