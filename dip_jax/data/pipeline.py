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
        if self.files is None:
            packed, metadata, oversize = self._packed(index)
            return Batch(collate(packed, self.cfg, self.cfg.data.seed), metadata, int(index), oversize)
        f = self.files
        packed, failed = f.samples(int(index))
        arrays = collate(packed, self.cfg, self.cfg.data.seed, f.dataset.placeholders)
        return Batch(arrays, f.metadata(int(index)), int(index), f.oversize(int(index)), f.epoch(int(index)), failed)


def batch_dataset(cfg: TrainConfig, split: str = "train", cache_dir=None) -> grain.MapDataset:
    return grain.MapDataset.range(0, STREAM_LENGTH).map(PackedBatches(cfg, split, cache_dir=cache_dir))


def train_iterator(cfg: TrainConfig, cache_dir=None):
    """A checkpointable grain iterator over training batches (state: the next batch index)."""
    ds = batch_dataset(cfg, "train", cache_dir).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.data.prefetch))
    return iter(ds)
