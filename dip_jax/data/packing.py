"""Greedy packing of samples into fixed-size microbatches (as the paper packs 8192 tokens).

Works on metadata alone, so the planner CLI packs a metadata file exactly as the trainer packs
the samples those lines describe.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import SampleMeta
from dip_jax.specs import clips


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per-microbatch capacity and the unit conversions from metadata to slots."""

    seq_len: int
    max_images: int
    max_audio_clips: int
    max_video_clips: int
    tokens_per_image: int
    tokens_per_audio_clip: int
    audio_clip_seconds: float
    video_clip_seconds: float
    # extra encoders: (name, item slots, sequence tokens per item, SampleMeta -> items)
    extra: tuple = ()

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Budget":
        from dip_jax import specs
        m, d = cfg.model, cfg.data
        extra = []
        for name, sub in m.extra_modules:
            spec = specs.get(name)
            extra.append((name, spec.capacity(d, sub), spec.tokens_per_item(sub),
                          lambda meta, spec=spec, sub=sub: spec.items(meta, sub)))
        return cls(
            seq_len=d.seq_len,
            max_images=d.max_images if m.vision is not None else 0,
            max_audio_clips=d.max_audio_clips if m.audio is not None else 0,
            max_video_clips=d.max_video_clips if m.dit is not None else 0,
            tokens_per_image=m.vision.tokens_per_image if m.vision is not None else 0,
            tokens_per_audio_clip=m.audio.tokens_per_clip if m.audio is not None else 0,
            audio_clip_seconds=m.audio.clip_seconds if m.audio is not None else 1.0,
            video_clip_seconds=m.dit.clip_seconds if m.dit is not None else 1.0,
            extra=tuple(extra),
        )

    def audio_clips(self, meta: SampleMeta) -> int:
        return clips(meta.audio_seconds, self.audio_clip_seconds)

    def video_clips(self, meta: SampleMeta) -> int:
        return clips(meta.video_seconds, self.video_clip_seconds)

    def extra_items(self, meta: SampleMeta) -> tuple[int, ...]:
        return tuple(items(meta) for _, _, _, items in self.extra)

    def usage(self, meta: SampleMeta) -> tuple[int, ...]:
        """(sequence tokens, images, audio clips, video clips, extra encoders' items...) a sample occupies."""
        a, x = self.audio_clips(meta), self.extra_items(meta)
        tokens = meta.text_tokens + meta.images * self.tokens_per_image + a * self.tokens_per_audio_clip
        tokens += sum(n * t for n, (_, _, t, _) in zip(x, self.extra))
        return (tokens, meta.images, a, self.video_clips(meta), *x)

    @property
    def capacity(self) -> tuple[int, ...]:
        return (self.seq_len, self.max_images, self.max_audio_clips, self.max_video_clips,
                *(c for _, c, _, _ in self.extra))

    def fits_alone(self, meta: SampleMeta) -> bool:
        return all(u <= c for u, c in zip(self.usage(meta), self.capacity))


def pack_greedy(metas: Sequence[SampleMeta], budget: Budget, microbatches: int | None = None
                ) -> tuple[list[list[int]], int]:
    """Greedy in stream order: add the next sample to the open microbatch while it fits,
    else close it and open a new one. Returns (microbatches as sample indices, samples used).

    With `microbatches`, stops once that many are full (the sample that did not fit is not
    used). A sample that cannot fit even alone raises: generators must not produce one.
    """
    out: list[list[int]] = []
    cur: list[int] = []
    used = [0] * len(budget.capacity)
    for i, meta in enumerate(metas):
        if not budget.fits_alone(meta):
            raise ValueError(f"sample {i} ({meta}) does not fit in one microbatch {budget.capacity}")
        u = budget.usage(meta)
        if any(a + b > c for a, b, c in zip(used, u, budget.capacity)):
            out.append(cur)
            if microbatches is not None and len(out) == microbatches:
                return out, i
            cur, used = [], [0] * len(budget.capacity)
        cur.append(i)
        used = [a + b for a, b in zip(used, u)]
    if cur:
        out.append(cur)
    return out, len(metas)


def pack_into_batches(metas: Sequence[SampleMeta], budget: Budget, microbatches: int
                      ) -> list[list[list[SampleMeta]]]:
    """Pack a metadata stream into consecutive batches of `microbatches` microbatches.

    A final partial batch is kept (the planner may see it; the trainer never asks for one).
    """
    batches, start = [], 0
    while start < len(metas):
        mbs, used = pack_greedy(metas[start:], budget, microbatches)
        batches.append([[metas[start + i] for i in mb] for mb in mbs])
        start += used
    return batches


def pack_best_fit(metas: Sequence[SampleMeta], budget: Budget, microbatches: int, window: int = 16
                  ) -> tuple[list[list[int]], list[int], bool]:
    """Best fit over `microbatches` open microbatches: each sample in stream order goes to the
    fullest microbatch (by sequence tokens) it still fits; one that fits none is deferred, and
    the batch closes after `window` deferrals in a row or when the stream ends.

    Returns (microbatches as sample indices, the samples not placed in order, whether the batch
    closed; if not, the stream ran out first and a longer one extends the same decisions).
    Every microbatch gets a sample before the batch closes, since a sample fits an empty one.
    """
    bins: list[list[int]] = [[] for _ in range(microbatches)]
    used = [[0] * len(budget.capacity) for _ in range(microbatches)]
    deferred: list[int] = []
    misses = 0
    for i, meta in enumerate(metas):
        if not budget.fits_alone(meta):
            raise ValueError(f"sample {i} ({meta}) does not fit in one microbatch {budget.capacity}")
        u = budget.usage(meta)
        fits = [b for b in range(microbatches) if all(a + x <= c for a, x, c in zip(used[b], u, budget.capacity))]
        if not fits:
            deferred.append(i)
            misses += 1
            if misses > window and all(bins):
                return bins, deferred + list(range(i + 1, len(metas))), True
            continue
        misses = 0
        b = max(fits, key=lambda b: (used[b][0], -b))
        bins[b].append(i)
        used[b] = [a + x for a, x in zip(used[b], u)]
    return bins, deferred, False


def padding_fraction(metadata: Sequence[Sequence[SampleMeta]], budget: Budget) -> float:
    """The share of a batch's sequence slots that hold no sample token."""
    used = sum(budget.usage(m)[0] for mb in metadata for m in mb)
    return 1.0 - used / max(1, len(metadata) * budget.seq_len)
