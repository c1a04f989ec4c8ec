"""A stack of identical blocks whose parameters carry a leading layer axis.

Every module is `embed -> blocks -> head`. Its blocks can be cut into chunks of consecutive
layers: `apply_layers(stack_def, layer_params[a:b], carry, ctx)` is a pure function of the
sliced parameters and the carried activation, which is what a pipeline stage runs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def make_stack(build: Callable[[nnx.Rngs], nnx.Module], layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build `layers` copies of a block with independent initialisation, stacked on axis 0."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def _make(r):
        return build(r)

    return _make(rngs)


def apply_layers(block_def: nnx.GraphDef, layer_params: Any, carry: Any,
                 step: Callable[[nnx.Module, Any], Any]):
    """Scan `step(block, carry) -> carry` over the leading layer axis of `layer_params`."""

    def body(c, p):
        return step(nnx.merge(block_def, p), c), None

    return jax.lax.scan(body, carry, layer_params)[0]


def slice_layers(layer_params: Any, start: int, stop: int) -> Any:
    return jax.tree.map(lambda a: a[start:stop], layer_params)


def num_layers(layer_params: Any) -> int:
    return jax.tree.leaves(layer_params)[0].shape[0]


class ChunkedModule(nnx.Module):
    """Base for modality modules: `embed(inputs) -> carry`, `blocks`, `head(carry) -> out`.

    Subclasses define `embed`, `step(block, carry, ctx)` and `head`. `ctx` is per-batch data
    every block reads but never changes (positions, segment ids).
    """

    blocks: nnx.Module

    def context(self, inputs) -> Any:
        return None

    def step(self, block, carry, ctx):
        raise NotImplementedError

    def run_blocks(self, layer_params, carry, ctx):
        """Run a chunk: the layers in `layer_params` (a slice of this module's stack)."""
        block_def = nnx.graphdef(self.blocks)
        return apply_layers(block_def, layer_params, carry, lambda b, c: self.step(b, c, ctx))

    def layer_params(self):
        return nnx.state(self.blocks)

    def __call__(self, inputs):
        ctx = self.context(inputs)
        return self.head(self.run_blocks(self.layer_params(), self.embed(inputs), ctx))
