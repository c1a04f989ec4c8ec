"""A module's layer stack [L, ...] <-> per-rank chunk stacks [P, K, Lc, ...] (+ layer mask).

Chunk c = v*P + r holds `layers[c]` consecutive layers and lives at [r, v]; chunks shorter than
the longest are padded with masked layers. Checkpoints, optimizers and the reference model keep
seeing ordinary per-module parameters: `unstack` maps gradients back.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class StageLayout:
    P: int
    K: int
    layers: tuple[int, ...]          # per chunk c

    @property
    def width(self) -> int:
        return max(self.layers)

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """[P, K, Lc] layer index (L for padding) and validity mask."""
        L = sum(self.layers)
        offsets = np.cumsum((0,) + self.layers[:-1])
        idx = np.full((self.P, self.K, self.width), L, np.int32)
        for c, (off, n) in enumerate(zip(offsets, self.layers)):
            idx[c % self.P, c // self.P, :n] = off + np.arange(n)
        return idx, idx < L


def stack(layer_params, layout: StageLayout):
    """[L, ...] leaves -> [P, K, Lc, ...] (padding repeats layer 0; it is masked)."""
    idx, valid = layout.index()
    safe = np.where(valid, idx, 0)
    return jax.tree.map(lambda a: a[safe], layer_params), jnp.asarray(valid)


def unstack(stacked, layout: StageLayout):
    """[P, K, Lc, ...] leaves -> [L, ...]; padded layers are dropped."""
    idx, valid = layout.index()
    L = sum(layout.layers)
    flat_idx = idx.reshape(-1)

    def one(a):
        flat = a.reshape(-1, *a.shape[3:])
        out = jnp.zeros((L, *a.shape[3:]), a.dtype)
        return out.at[flat_idx].add(flat, mode="drop")
    return jax.tree.map(one, stacked)
