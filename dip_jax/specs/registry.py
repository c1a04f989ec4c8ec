"""The module-spec registry: what the library knows of a module type, as data.

A module spec has two halves that respect the layering. This half is pure Python (the planner
reads it): the module's role in the graph, how many items a sample brings it, how many slots a
microbatch has for them, its cost-model formulas, and how its inputs are collated into the
batch (numpy). The other half (`runtime`) is jax: the chunked Flax NNX module and the small
adapters the tick engine calls; it is named here by a "package.module:ATTRIBUTE" string (or
given as the object) and only imported when a run needs it.

The graph has three roles: encoders feed the backbone (their projected outputs replace
placeholder tokens of its sequence), there is one backbone, and at most one generator
conditioned on the backbone's final hidden states. The built-in vision, audio, llm and dit are
four specs (`builtin.py`); `register` adds one.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable

ENCODER, BACKBONE, GENERATOR = "encoder", "backbone", "generator"
ROLES = (ENCODER, BACKBONE, GENERATOR)


def clips(seconds: float, clip_seconds: float) -> int:
    """Whole clips of `clip_seconds` that cover `seconds` (a last partial clip counts)."""
    return math.ceil(seconds / clip_seconds - 1e-9) if seconds > 0 else 0


@dataclasses.dataclass(frozen=True)
class EncoderItems:
    """How an encoder's items are collated: a sample's items (its `Sample.extra[sample_field]`,
    or for the built-in modules the Sample attribute of that name; [n, *item_shape]) go into `input_key` [M, capacity, *item_shape];
    the sequence positions of the sample's `placeholder` tokens into `positions_key`
    [M, capacity, tokens_per_item] (seq_len = padding, dropped on merge)."""

    input_key: str
    positions_key: str
    placeholder: int
    sample_field: str
    item_shape: Callable[[Any], tuple[int, ...]]      # module config -> one item's input shape


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """The planner half of a module type. Callables take the module's own config (`cfg`:
    a BlockConfig subclass with layers, dim, heads, kv_heads, mlp_hidden, block_params()) and,
    where named so, the backbone width `d`."""

    name: str
    role: str
    runtime: Any                                        # "pkg.mod:ATTR" or a runtime.ModuleRuntime
    items: Callable[[Any, Any], int] = lambda meta, cfg: 1       # (SampleMeta, cfg) -> items of a sample
    capacity: Callable[[Any, Any], int] = lambda data, cfg: 1     # (DataConfig, cfg) -> item slots per microbatch
    tokens_per_item: Callable[[Any], int] = lambda cfg: 0        # backbone positions per item (encoders)
    layer_tokens: Callable[[Any, int], int] = lambda cfg, seq_len: seq_len   # tokens per item in its layers
    metadata: tuple[str, ...] = ()                      # metadata keys it adds to SampleMeta
    # cost model: parameters of the embed / head, matmul parameters a layer has beyond a
    # transformer block's, cross-attention key/value tokens, width of the carry per token
    embed_params: Callable[[Any, int], int] = lambda cfg, d: cfg.embed_params()
    head_params: Callable[[Any, int], int] = lambda cfg, d: cfg.head_params(d)
    head_tokens: Callable[[Any, int], int] = lambda cfg, n: n
    embed_is_matmul: bool = True
    causal: bool = False
    layer_extra_params: Callable[[Any], int] = lambda cfg: 0
    cross_tokens: Callable[[Any], int] = lambda cfg: 0
    carry_width: Callable[[Any], float] = lambda cfg: cfg.dim
    encoder_items: EncoderItems | None = None           # encoders: how their inputs are collated
    collate: Any = None                                 # others: an object with init/place/finish
    color: str = "#8c8c8c"                              # in timelines

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"module spec {self.name!r}: role {self.role!r} is not one of {ROLES}")
        if self.role == ENCODER and self.encoder_items is None:
            raise ValueError(f"module spec {self.name!r}: an encoder needs encoder_items")

    def param_count(self, cfg, d: int) -> int:
        return self.embed_params(cfg, d) + cfg.layers * cfg.block_params() + self.head_params(cfg, d)

    def runtime_half(self):
        """The runtime half (imports jax)."""
        if isinstance(self.runtime, str):
            mod, _, attr = self.runtime.partition(":")
            return getattr(importlib.import_module(mod), attr)
        return self.runtime


_REGISTRY: dict[str, ModuleSpec] = {}


def register(spec: ModuleSpec, replace: bool = False) -> ModuleSpec:
    """Make a module type known under `spec.name` (a model config then names its config in
    `ModelConfig.extra_modules`). Re-registering an equal spec is a no-op."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"module spec {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModuleSpec:
    if name not in _REGISTRY:
        raise KeyError(f"no module spec {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def registered() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def role_of(name: str) -> str:
    """The role of a registered module ('' for names no spec knows, e.g. a mixed chunk)."""
    return _REGISTRY[name].role if name in _REGISTRY else ""


def graph_order(names) -> tuple[str, ...]:
    """Names in graph order: encoders (in the order given), the backbone, the generator."""
    names = tuple(names)
    return tuple(n for r in ROLES for n in names if get(n).role == r)


def with_role(model, role: str) -> str | None:
    """The first module of `model` with `role` (the backbone, the generator), or None."""
    return next((n for n in model.modules if get(n).role == role), None)


def max_items(model, data) -> dict[str, int]:
    """Item slots per microbatch of each module of `model` but the backbone."""
    return {n: get(n).capacity(data, model.module(n)) for n in model.modules if get(n).role != BACKBONE}


def metadata_keys() -> tuple[str, ...]:
    return tuple(k for s in _REGISTRY.values() for k in s.metadata)

