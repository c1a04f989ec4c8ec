"""grain input pipelines: batch index -> packed, collated Batch; checkpointable iterators."""
from __future__ import annotations

import grain
import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.data.collate import Batch, collate
from dip_jax.data.oversize import fit_sample
from dip_jax.data.packing import Budget, pack_greedy

_SPLIT_CODE = {"train": 0, "eval": 1}
_IDS_PER_BATCH = 1 << 20
STREAM_LENGTH = (1 << 31) - 1


def sample_source(cfg: TrainConfig, split: str, content: bool = True):
    if cfg.data.task == "digits":
        from dip_jax.data.digits import DigitSamples
        return DigitSamples(cfg, split)
    from dip_jax.data.synthetic import SyntheticSamples
    return SyntheticSamples(cfg, content)


class PackedBatches:
    """grain map transform: a batch index -> a Batch of `data.microbatches` packed microbatches.

    Each batch draws its samples from a generator seeded by (seed, split, index) and packs
    them greedily; the sample that does not fit into the last microbatch is dropped. Batch i is
    therefore a pure function of i, which makes iterator resumption exact.
    """

    def __init__(self, cfg: TrainConfig, split: str = "train", content: bool = True):
        self.cfg, self.split, self.content = cfg, split, content
        self.samples = sample_source(cfg, split, content)
        self.budget = Budget.from_config(cfg)

    def metadata(self, index: int) -> tuple[tuple, ...]:
        """Just the batch's metadata, per microbatch (what the planner sees)."""
        return self._packed(index)[1]

    def metadata_and_oversize(self, index: int):
        """(metadata per microbatch, (samples truncated, samples skipped)) of one batch."""
        _, metadata, oversize = self._packed(index)
        return metadata, oversize

    def __call__(self, index: int) -> Batch:
        packed, metadata, oversize = self._packed(index)
        return Batch(collate(packed, self.cfg, self.cfg.data.seed), metadata, int(index), oversize)

    def _packed(self, index: int):
        index = int(index)
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


def batch_dataset(cfg: TrainConfig, split: str = "train") -> grain.MapDataset:
    return grain.MapDataset.range(0, STREAM_LENGTH).map(PackedBatches(cfg, split))


def train_iterator(cfg: TrainConfig):
    """A checkpointable grain iterator over training batches (state: the next batch index)."""
    ds = batch_dataset(cfg, "train").to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.data.prefetch))
    return iter(ds)
