"""Vision encoder: ViT over fixed-size patches, spatial merge, projector to the llm width."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dip_jax.config import VisionConfig
from dip_jax.models.layers import Block, Projector, linear, norm
from dip_jax.models.stack import ChunkedModule, make_stack


def patchify(images, patch: int):
    """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C], row-major over patches."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


class ViT(ChunkedModule):
    def __init__(self, cfg: VisionConfig, out_dim: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention: str = "xla"):
        self.cfg, self.dtype = cfg, dtype
        # a linear over row-major p x p x C patches is the stride-p conv of CLIP/SigLIP
        self.patch_embed = linear(cfg.patch_size ** 2 * cfg.channels, cfg.dim, rngs, bias=cfg.patch_bias, dtype=dtype)
        self.pos = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (cfg.tokens, cfg.dim)))
        if cfg.class_token:
            self.cls = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (cfg.dim,)))
        self.pre_norm = norm(cfg, rngs, dtype) if cfg.pre_norm else None
        self.blocks = make_stack(lambda r: Block(cfg, r, dtype, attention), cfg.layers, rngs)
        self.norm = norm(cfg, rngs, dtype) if cfg.head_norm else None
        self.projector = Projector(cfg.spatial_merge ** 2 * cfg.dim, out_dim, rngs, dtype)

    def embed(self, images):
        x = self.patch_embed(patchify(images, self.cfg.patch_size))
        if self.cfg.class_token:
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos[...].astype(self.dtype)
        return x if self.pre_norm is None else self.pre_norm(x)

    def step(self, block, x, ctx):
        return block(x)

    def features(self, x):
        """The tower's output (transformers' last_hidden_state): the final norm, if any."""
        return x if self.norm is None else self.norm(x)

    def head(self, x):
        c = self.cfg
        s, m = c.patches_per_side, c.spatial_merge
        x = self.features(x)[:, c.class_token:]
        x = x.reshape(x.shape[0], s // m, m, s // m, m, c.dim)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], (s // m) ** 2, m * m * c.dim)
        return self.projector(x)
