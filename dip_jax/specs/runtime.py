"""The runtime half of a module spec: the chunked module and its adapters (called under jax).

The module follows the chunked protocol of `dip_jax.models.stack.ChunkedModule`: `embed`
(first chunk), `step` per block of its `blocks` stack, `head` (last chunk), `context` (what
every block reads besides the carry). The adapters say how a first chunk reads its inputs from
the batch and what a last chunk's loss is. The tick engine (runtime/executor.py) and the
unpipelined model (models/lmm.py) both call them, so the two compute the same function.

Batch arrays have a leading microbatch axis; `b` below is a dict of the keys a module names
(`batch_keys`), with the microbatch axis (the backbone: [m, S, ...]) or flattened into items
(the generator: [n, ...]); `batch` is the whole batch (the normalisers in `scalars`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class ModuleRuntime:
    build: Callable[..., Any]            # (model_cfg, cfg, d, rngs, dtype) -> the chunked nnx.Module
    example_input: Callable[..., Any]    # (model_cfg, units, seq_len, make) -> what `embed` takes for `units`
    #                                      items (one sequence: the backbone); make(shape, dtype) -> array
    batch_keys: tuple[str, ...] = ()     # backbone: per-sequence arrays; generator: per-item arrays
    inputs: Callable | None = None       # backbone: (b, merges) -> embed inputs;
    #                                      generator: (b, cond) -> (embed inputs, loss target)
    loss: Callable | None = None         # backbone: (head output, b, batch) -> (final hidden states, loss);
    #                                      generator: (head output, target, b, batch) -> loss
    cond_key: str = ""                   # generator: per-item backbone positions it conditions on
    loss_weight: Callable[[Any], float] = lambda model_cfg: 1.0
    loss_name: str = ""                  # its loss in the unpipelined model's aux dict
    scalars: tuple[str, ...] = ()        # global loss normalisers it reads from `batch`
