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
    def __init__(self, cfg: VisionConfig, out_dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        self.patch_embed = linear(cfg.patch_size ** 2 * cfg.channels, cfg.dim, rngs, bias=True, dtype=dtype)
        self.pos = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (cfg.patches, cfg.dim)))
        self.blocks = make_stack(lambda r: Block(cfg, r, dtype), cfg.layers, rngs)
        self.norm = norm(cfg, rngs, dtype)
        self.projector = Projector(cfg.spatial_merge ** 2 * cfg.dim, out_dim, rngs, dtype)

    def embed(self, images):
        return self.patch_embed(patchify(images, self.cfg.patch_size)) + self.pos[...].astype(self.dtype)

    def step(self, block, x, ctx):
        return block(x)

    def head(self, x):
        c = self.cfg
        s, m = c.patches_per_side, c.spatial_merge
        x = self.norm(x).reshape(x.shape[0], s // m, m, s // m, m, c.dim)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], (s // m) ** 2, m * m * c.dim)
        return self.projector(x)
