"""Batch metadata -> what each module must process in each microbatch."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import SampleMeta
from dip_jax.data.packing import Budget


@dataclasses.dataclass(frozen=True)
class Workload:
    """items[mb][module]: images (vision), audio clips (audio), 1 packed sequence (llm), video
    clips (dit) of each microbatch."""

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
    budget = Budget.from_config(cfg)
    mods = cfg.model.modules
    per = {
        "vision": lambda mb: sum(s.images for s in mb),
        "audio": lambda mb: sum(budget.audio_clips(s) for s in mb),
        "llm": lambda mb: 1,
        "dit": lambda mb: sum(budget.video_clips(s) for s in mb),
    }
    return Workload(mods, tuple(tuple(per[m](mb) for m in mods) for mb in microbatches))
