"""Packed batches as a pure function of their index (numpy only, no grain and no jax).

Batch i draws its samples from a generator seeded by (seed, split, i) and packs them greedily;
the sample that does not fit into the last microbatch is dropped. The trainer's grain pipeline
(`pipeline.PackedBatches`) collates these batches; the planner and the plan CLI read their
metadata here, so both see exactly the same microbatches without importing an input pipeline.
"""
from __future__ import annotations

import functools

import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.data.oversize import fit_sample
from dip_jax.data.packing import Budget, pack_greedy

_SPLIT_CODE = {"train": 0, "eval": 1}
_IDS_PER_BATCH = 1 << 20


@functools.lru_cache(maxsize=4)
def file_stream(cfg: TrainConfig, split: str, cache_dir: str | None = None):
    """One FileStream per (config, split, index cache): its index is read once per process."""
    from dip_jax.data.files.source import FileStream
    return FileStream(cfg, split, cache_dir)


def sample_source(cfg: TrainConfig, split: str, content: bool = True):
    if cfg.data.task == "digits":
        from dip_jax.data.digits import DigitSamples
        return DigitSamples(cfg, split)
    from dip_jax.data.synthetic import SyntheticSamples
    return SyntheticSamples(cfg, content)


class PackedStream:
    """A batch index -> its `data.microbatches` packed microbatches of samples."""

    def __init__(self, cfg: TrainConfig, split: str = "train", content: bool = True, cache_dir=None):
        """`cache_dir`: where the files task keeps its metadata index."""
        self.cfg, self.split, self.content = cfg, split, content
        self.files = file_stream(cfg, split, None if cache_dir is None else str(cache_dir)) \
            if cfg.data.task == "files" else None
        self.samples = None if self.files is not None else sample_source(cfg, split, content)
        self.budget = Budget.from_config(cfg)

    def metadata(self, index: int) -> tuple[tuple, ...]:
        """Just the batch's metadata, per microbatch (what the planner sees)."""
        return self.metadata_and_oversize(index)[0]

    def metadata_and_oversize(self, index: int):
        """(metadata per microbatch, (samples truncated, samples skipped)) of one batch."""
        if self.files is not None:                 # from the index: nothing decoded
            return self.files.metadata(int(index)), self.files.oversize(int(index))
        _, metadata, oversize = self._packed(index)
        return metadata, oversize

    def _packed(self, index: int):
        index = int(index)
        if self.files is not None:
            packed, _ = self.files.samples(index)
            return packed, self.files.metadata(index), self.files.oversize(index)
        d = self.cfg.data
        rng = np.random.default_rng([d.seed, _SPLIT_CODE[self.split], index])
        stream, drawn = [], 0
        skipped_before: list[int] = []        # per kept sample: samples skipped before it
        truncated: list[bool] = []
        while True:
            for _ in range(4 * d.microbatches):
                raw = self.samples.sample(rng, index * _IDS_PER_BATCH + drawn)
                drawn += 1
                s = fit_sample(raw, self.budget, d.oversize)
                if s is not None:
                    skipped_before.append(drawn - 1 - len(stream))
                    truncated.append(s is not raw)
                    stream.append(s)
            mbs, used = pack_greedy([s.meta for s in stream], self.budget, d.microbatches)
            if used < len(stream):
                break
        packed = [[stream[i] for i in mb] for mb in mbs]
        oversize = (sum(truncated[:used]), skipped_before[used])
        return packed, tuple(tuple(s.meta for s in mb) for mb in packed), oversize
