"""grain input pipelines: batch index -> packed, collated Batch; checkpointable iterators."""
from __future__ import annotations

import grain

from dip_jax.config import TrainConfig
from dip_jax.data.collate import Batch, collate
from dip_jax.data.stream import PackedStream

STREAM_LENGTH = (1 << 31) - 1


class PackedBatches(PackedStream):
    """grain map transform: a batch index -> a collated Batch of `data.microbatches` packed
    microbatches (data/stream.py). Batch i is a pure function of i, which makes iterator
    resumption exact."""

    def __call__(self, index: int) -> Batch:
        packed, metadata, oversize = self._packed(index)
        return Batch(collate(packed, self.cfg, self.cfg.data.seed), metadata, int(index), oversize)


def batch_dataset(cfg: TrainConfig, split: str = "train") -> grain.MapDataset:
    return grain.MapDataset.range(0, STREAM_LENGTH).map(PackedBatches(cfg, split))


def train_iterator(cfg: TrainConfig):
    """A checkpointable grain iterator over training batches (state: the next batch index)."""
    ds = batch_dataset(cfg, "train").to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.data.prefetch))
    return iter(ds)
