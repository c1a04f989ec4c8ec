"""Batch metadata -> what each module must process in each microbatch."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import SampleMeta
from dip_jax import specs


@dataclasses.dataclass(frozen=True)
class Workload:
    """items[mb][module]: what each module's spec counts in each microbatch (images, audio or
    video clips; 1 packed sequence for the backbone)."""

    modules: tuple[str, ...]
    items: tuple[tuple[int, ...], ...]

    @property
    def microbatches(self) -> int:
        return len(self.items)

    def count(self, mb: int, module: str) -> int:
        return self.items[mb][self.modules.index(module)]

    def mean(self, module: str) -> float:
        return sum(self.count(m, module) for m in range(self.microbatches)) / max(1, self.microbatches)


def workload_from_metadata(cfg: TrainConfig, microbatches: Sequence[Sequence[SampleMeta]]) -> Workload:
    model = cfg.model
    mods = model.modules

    def count(name, mb):
        spec = specs.get(name)
        if spec.role == specs.BACKBONE:
            return 1
        return sum(spec.items(s, model.module(name)) for s in mb)
    return Workload(mods, tuple(tuple(count(m, mb) for m in mods) for mb in microbatches))
