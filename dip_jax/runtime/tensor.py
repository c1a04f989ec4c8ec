"""Tensor parallelism inside a pipeline rank, its collectives written out (Megatron's f and g).

Every device of a rank's 'tensor' group holds its share of each block's attention heads and
MLP hidden units (the rules in runtime/sharding.py) and runs the chunk on that share. The
runtime wraps the block's linears as the rules name them: a column-parallel linear (q/k/v,
gate/up) reads a replicated input whose cotangent is summed over the group (f); a
row-parallel linear (attention output, down) returns partial sums that are summed over the
group (g). The residual stream, norms and everything outside the blocks stay replicated, so
the models need not know any of this.

Why not leave 'tensor' to the compiler (shard_map manual over ('data', 'pipe') only): XLA then
partitions a chunk on its own terms, with collective-permutes among all devices inside the
predicated op bodies; the ranks that skip a body never join them and the program deadlocks
(tests/test_tensor.py runs that failure on a minimal program). The all-reduces here only
involve one rank's group, and every device of a group runs the same ops.
"""
from __future__ import annotations

import jax
from flax import nnx
from jax import lax

from dip_jax.runtime.sharding import tensor_role


def _collectives(axis: str):
    @jax.custom_vjp
    def enter(x):
        return x

    enter.defvjp(lambda x: (x, None), lambda _, ct: (lax.psum(ct, axis),))

    @jax.custom_vjp
    def leave(x):
        return lax.psum(x, axis)

    leave.defvjp(lambda x: (lax.psum(x, axis), None), lambda _, ct: (ct,))
    return enter, leave


class _Column:
    def __init__(self, inner, enter):
        self.inner, self.enter = inner, enter

    def __call__(self, x, *args, **kwargs):
        return self.inner(self.enter(x), *args, **kwargs)


class _Row:
    """The partial products are summed over the group, then the (replicated) bias is added
    once: adding it on every device before the sum would count it tensor-size times."""

    def __init__(self, inner, leave):
        self.inner, self.leave = inner, leave

    def __call__(self, x):
        lin = self.inner
        if lin.bias is None:
            return self.leave(lin(x))
        # nnx.Linear's own computation, without its bias
        x, kernel, bias = lin.promote_dtype((x, lin.kernel[...], lin.bias[...]), dtype=lin.dtype)
        y = lin.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=lin.precision)
        return self.leave(y) + bias


def split_block(block: nnx.Module, axis: str, drop_reductions: bool = False) -> nnx.Module:
    """`block` (merged from its device-local parameter shards) with its column- and
    row-parallel linears wrapped; call inside the executor's shard_map. `drop_reductions`
    leaves them unwrapped: what a runtime that split the parameters but forgot the
    collectives would compute (the tensor tests' negative control)."""
    if drop_reductions:
        return block
    enter, leave = _collectives(axis)
    for path, sub in list(block.iter_modules()):
        role = tensor_role(path) if path else None
        if role is None:
            continue
        parent = block
        for key in path[:-1]:
            parent = getattr(parent, key)
        wrapped = _Column(sub, enter) if role == "column" else _Row(sub, leave)
        object.__setattr__(parent, path[-1], wrapped)
    return block
