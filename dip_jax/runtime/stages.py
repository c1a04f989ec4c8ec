"""A module's layer stack [L, ...] <-> per-rank chunk stacks [P, K, Lc, ...] (+ layer mask).

Chunk c = v*P + r holds `layers[c]` consecutive layers and lives at [r, v]; chunks shorter than
the longest are padded with masked layers. A pipelined train state keeps its block parameters
(and their optimizer moments) in this stage layout; the model layout [L, ...] is what the
unpipelined model and its reference step use. `relayout` converts any state tree between the
two, or between two stage layouts, leaf by leaf: a leaf is a block stack when its path holds
[module]['blocks'], which is true of a parameter and of every optimizer moment of it.
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

    def to_json(self) -> dict:
        return {"P": self.P, "K": self.K, "layers": list(self.layers)}

    @classmethod
    def from_json(cls, d: dict) -> "StageLayout":
        return cls(int(d["P"]), int(d["K"]), tuple(int(n) for n in d["layers"]))


# per module: its StageLayout, or None for the model layout [L, ...]
Layouts = dict[str, "StageLayout | None"]


def layouts_to_json(layouts: Layouts) -> dict:
    return {m: None if l is None else l.to_json() for m, l in layouts.items()}


def layouts_from_json(d: dict) -> Layouts:
    return {m: None if l is None else StageLayout.from_json(l) for m, l in d.items()}


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def block_module(path, modules) -> str | None:
    """The module whose block stack this leaf belongs to (path ...[module]['blocks']...), else None."""
    keys = [_key(k) for k in path]
    for i in range(len(keys) - 1):
        if keys[i] in modules and keys[i + 1] == "blocks":
            return keys[i]
    return None


def stack_leaf(a, layout: StageLayout):
    """[L, ...] -> [P, K, Lc, ...] (padding repeats layer 0; it is masked)."""
    idx, valid = layout.index()
    return a[np.where(valid, idx, 0)]


def unstack_leaf(a, layout: StageLayout):
    """[P, K, Lc, ...] -> [L, ...]; padded layers are dropped."""
    idx, _ = layout.index()
    flat = a.reshape(-1, *a.shape[3:])
    out = jnp.zeros((sum(layout.layers), *a.shape[3:]), a.dtype)
    return out.at[idx.reshape(-1)].add(flat, mode="drop")


def stack(layer_params, layout: StageLayout):
    """A module's block tree [L, ...] -> ([P, K, Lc, ...] tree, validity mask [P, K, Lc])."""
    return jax.tree.map(lambda a: stack_leaf(a, layout), layer_params), jnp.asarray(layout.index()[1])


def unstack(stacked, layout: StageLayout):
    return jax.tree.map(lambda a: unstack_leaf(a, layout), stacked)


def convert_leaf(a, src: StageLayout | None, dst: StageLayout | None):
    if src == dst:
        return a
    if src is not None:
        a = unstack_leaf(a, src)
    return a if dst is None else stack_leaf(a, dst)


def relayout(tree, src: Layouts, dst: Layouts):
    """Convert every block leaf of `tree` (params, gradients or optimizer state) from the
    layouts `src` to `dst` (per module); other leaves pass through. Traceable."""
    modules = set(src) | set(dst)

    def one(path, a):
        m = block_module(path, modules)
        return a if m is None else convert_leaf(a, src.get(m), dst.get(m))
    return jax.tree_util.tree_map_with_path(one, tree)


def like(ref, tree):
    """`tree`'s leaves in `ref`'s tree types (nnx.State and dict levels differ in type but
    flatten alike, in key order)."""
    return jax.tree.unflatten(jax.tree.structure(ref), jax.tree.leaves(tree))
