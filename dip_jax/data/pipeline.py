"""grain input pipelines: batch index -> packed, collated Batch; checkpointable iterators."""
from __future__ import annotations

import dataclasses

import grain

from dip_jax.config import TrainConfig
from dip_jax.data.collate import Batch, collate
from dip_jax.data.stream import PackedStream

STREAM_LENGTH = (1 << 31) - 1


@dataclasses.dataclass(frozen=True)
class Share:
    """The microbatches of a batch whose records one process decodes: those its data replicas
    train. `order`: metadata -> the microbatch order the planner gives the replicas
    (`plan.schedulers.ReplicaOrder`), computed alike on every process."""
    order: object
    replicas: tuple[int, ...]

    def rows(self, metadata) -> tuple[int, ...]:
        return replica_rows(self.order(metadata), self.replicas, self.order.cfg.mesh.data)


def replica_rows(order, replicas, data: int) -> tuple[int, ...]:
    """The batch's microbatches that `replicas` train under `order` (see `balance`)."""
    per = len(order) // data
    return tuple(sorted(order[r * per + j] for r in replicas for j in range(per)))


class PackedBatches(PackedStream):
    """grain map transform: a batch index -> a collated Batch of `data.microbatches` packed
    microbatches (data/stream.py). Batch i is a pure function of i, which makes iterator
    resumption exact. With a `share` (the files task in a multi-process run), only this
    process's microbatches are decoded; the others stay empty (their arrays are zeros)."""

    def __init__(self, cfg: TrainConfig, split: str = "train", content: bool = True, cache_dir=None,
                 share: Share | None = None):
        super().__init__(cfg, split, content, cache_dir)
        self.cache_dir, self.share = cache_dir, share

    # grain's worker processes receive the transform pickled: they rebuild the stream (its index
    # is cached on disk) rather than receive its lock and layout
    def __getstate__(self):
        return {"args": (self.cfg, self.split, self.content, self.cache_dir, self.share)}

    def __setstate__(self, state):
        self.__init__(*state["args"])

    def __call__(self, index: int) -> Batch:
        rows = None
        if self.files is not None and self.share is not None:
            rows = self.share.rows(self.files.metadata(int(index)))
        return self.build(index, rows)

    def build(self, index: int, rows=None) -> Batch:
        """Batch `index`, its records decoded for microbatches `rows` only (None: all; the files task)."""
        if self.files is None:
            packed, metadata, oversize = self._packed(index)
            return Batch(collate(packed, self.cfg, self.cfg.data.seed), metadata, int(index), oversize)
        f = self.files
        packed, failed, decoded = f.decode(int(index), rows)
        by_reason: dict[str, int] = {}
        for _, why in failed:
            by_reason[why] = by_reason.get(why, 0) + 1
        arrays = collate(packed, self.cfg, self.cfg.data.seed, f.dataset.placeholders)
        return Batch(arrays, f.metadata(int(index)), int(index), f.oversize(int(index)), f.epoch(int(index)),
                     by_reason, rows=None if rows is None else tuple(rows), decoded=tuple(decoded),
                     failed=tuple(failed))


def batch_dataset(cfg: TrainConfig, split: str = "train", cache_dir=None, share: Share | None = None
                  ) -> grain.MapDataset:
    return grain.MapDataset.range(0, STREAM_LENGTH).map(PackedBatches(cfg, split, cache_dir=cache_dir, share=share))


def train_iterator(cfg: TrainConfig, cache_dir=None, share: Share | None = None):
    """A checkpointable grain iterator over training batches (state: the next batch index; with
    `data.workers`, each worker's), as `TrainData`: it restores the trainer's checkpoints."""
    d = cfg.data
    ds = batch_dataset(cfg, "train", cache_dir, share).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=d.prefetch))
    if d.workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads its worker options as absl flags, which a program without
            # absl.app never parses (google/grain#1355): their defaults are what we want
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.workers, per_worker_buffer_size=d.prefetch))
    return TrainData(iter(ds))


class TrainData:
    """The training iterator, whose checkpointed state also carries the run's data counts
    (decode failures by reason, records decoded per process), so that a resumed run's summary
    counts what the steps before the resume met. `counts`: those of the state restored last."""

    def __init__(self, iterator):
        self.iterator, self.counts = iterator, {}

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    @staticmethod
    def with_counts(state: dict, counts: dict) -> dict:
        """The state to checkpoint: the iterator's `get_state()` and the counts through its batch."""
        return {"grain": state, "counts": counts}

    def set_state(self, state: dict) -> None:
        if "grain" in state and "counts" in state:
            self.counts = dict(state["counts"])
            state = state["grain"]
        self.iterator.set_state(state)      # a checkpoint written before counts were carried: none
