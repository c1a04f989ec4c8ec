"""Samples that cannot fit one microbatch even alone (`data.oversize`).

Real data has them: a document with 24 images and 4,319 words does not fit 8,192 tokens. The
default, "truncate", is what LLaVA and Megatron-LM users expect: the sample is cut to the
microbatch (text and modality items past the cut are dropped, as a tokenizer's max length
would), so every sample still contributes. "skip" drops such samples; "error" stops at the
first one, naming it. Both paths count what they did, and the counts are reported.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dip_jax.data.metadata import AUD, IMG, Sample, SampleMeta
from dip_jax.data.packing import Budget


@dataclasses.dataclass
class OversizeCounts:
    truncated: int = 0
    skipped: int = 0

    def __iadd__(self, other: "OversizeCounts") -> "OversizeCounts":
        self.truncated += other.truncated
        self.skipped += other.skipped
        return self

    def fields(self) -> dict:
        return {"samples_truncated": self.truncated, "samples_skipped": self.skipped}

    def warning(self, policy: str, budget: Budget) -> str | None:
        if not (self.truncated or self.skipped):
            return None
        return (f"warning: {self.truncated} samples truncated and {self.skipped} skipped that did not fit one "
                f"microbatch ({budget.seq_len} tokens, {budget.max_images} images, {budget.max_audio_clips} audio "
                f"and {budget.max_video_clips} video clips; data.oversize={policy})")


def oversize_error(where: str, meta: SampleMeta, budget: Budget) -> ValueError:
    return ValueError(f"{where} ({meta}) does not fit one microbatch (tokens, images, audio clips, video clips) "
                      f"= {budget.capacity}; set data.oversize=truncate or skip")


def truncate_meta(meta: SampleMeta, b: Budget) -> SampleMeta:
    """The largest prefix-like cut of `meta` that fits: modality items first, the text after."""
    images = min(meta.images, b.max_images, b.seq_len // b.tokens_per_image if b.tokens_per_image else 0)
    room = b.seq_len - images * b.tokens_per_image
    clips = min(b.audio_clips(meta), b.max_audio_clips, room // b.tokens_per_audio_clip if b.tokens_per_audio_clip else 0)
    room -= clips * b.tokens_per_audio_clip
    video = min(b.video_clips(meta), b.max_video_clips)
    return SampleMeta(text_tokens=max(0, min(meta.text_tokens, room)), images=images,
                      audio_seconds=min(meta.audio_seconds, clips * b.audio_clip_seconds),
                      video_seconds=min(meta.video_seconds, video * b.video_clip_seconds))


def fit_metas(metas: Sequence[SampleMeta], budget: Budget, policy: str
              ) -> tuple[list[SampleMeta], OversizeCounts]:
    """Apply `policy` to a metadata stream (the plan CLI's path)."""
    out, counts = [], OversizeCounts()
    for i, meta in enumerate(metas):
        if budget.fits_alone(meta):
            out.append(meta)
        elif policy == "truncate":
            out.append(truncate_meta(meta, budget))
            counts.truncated += 1
        elif policy == "skip":
            counts.skipped += 1
        else:
            raise oversize_error(f"sample {i}", meta, budget)
    return out, counts


def truncate_sample(s: Sample, b: Budget) -> Sample:
    """Keep the sample's tokens in order until the microbatch is full; an image or audio clip
    is kept whole or dropped whole (with its placeholder run), and one past its slot limit is
    dropped while the text after it is kept, as `truncate_meta` counts."""
    if len(s.tokens) == 0:                      # metadata only (the planner's view)
        return dataclasses.replace(s, meta=truncate_meta(s.meta, b))
    toks = s.tokens
    keep = np.zeros(len(toks), bool)
    kept_images, kept_clips = [], []
    i = used = n_img = n_aud = 0
    while i < len(toks) and used < b.seq_len:
        t = int(toks[i])
        if t in (IMG, AUD):
            width = b.tokens_per_image if t == IMG else b.tokens_per_audio_clip
            kept, slots = (kept_images, b.max_images) if t == IMG else (kept_clips, b.max_audio_clips)
            if len(kept) < slots and used + width <= b.seq_len:
                keep[i:i + width] = True
                kept.append(n_img if t == IMG else n_aud)
                used += width
            n_img += t == IMG
            n_aud += t == AUD
            i += width
        else:
            keep[i] = True
            used += 1
            i += 1
    video = min(b.video_clips(s.meta), b.max_video_clips)
    meta = SampleMeta(text_tokens=used - len(kept_images) * b.tokens_per_image - len(kept_clips) * b.tokens_per_audio_clip,
                      images=len(kept_images),
                      audio_seconds=min(s.meta.audio_seconds, len(kept_clips) * b.audio_clip_seconds),
                      video_seconds=min(s.meta.video_seconds, video * b.video_clip_seconds))
    pick = lambda a, idx: None if a is None or not idx else a[idx]
    caption = None
    if s.caption is not None:
        new_pos = np.cumsum(keep) - 1
        caption = new_pos[s.caption[keep[s.caption]]]
    return dataclasses.replace(s, tokens=toks[keep], labels=s.labels[keep], meta=meta,
                               images=pick(s.images, kept_images), audio=pick(s.audio, kept_clips),
                               video=None if s.video is None or video == 0 else s.video[:video], caption=caption)


def fit_sample(s: Sample, budget: Budget, policy: str) -> Sample | None:
    """`s` if it fits, else truncated (policy "truncate"), None ("skip"), or ValueError."""
    if budget.fits_alone(s.meta):
        return s
    if policy == "truncate":
        return truncate_sample(s, budget)
    if policy == "skip":
        return None
    raise oversize_error(f"sample {s.sample_id}", s.meta, budget)
