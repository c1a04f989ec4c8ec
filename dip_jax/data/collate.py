"""Packed microbatches -> fixed-shape numpy arrays (the model's batch layout).

Shapes depend only on the config, never on the data, so one compiled step serves every batch:
tokens/targets/loss_mask/segment_ids/positions [M, S]; images [M, NI, H, W, C] with their
placeholder positions image_pos [M, NI, t] (S = padding, dropped on merge); audio likewise;
dit clips latents/noise [M, NV, T, C], t [M, NV], cond_idx/cond_mask [M, NV, Lc],
video_valid [M, NV]; loss normalisers n_tokens, n_clips (global, computed here).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import AUD, IMG, PAD, Sample, SampleMeta


@dataclasses.dataclass
class Batch:
    arrays: dict[str, np.ndarray]
    metadata: tuple[tuple[SampleMeta, ...], ...]   # per microbatch, per sample
    index: int = 0                                 # position in the stream
    oversize: tuple[int, int] = (0, 0)             # samples (truncated, skipped) by data.oversize


def noise_for(seed: int, sample_id: int, clip: int, shape) -> tuple[np.ndarray, np.float32]:
    """Diffusion noise and timestep of one clip, a function of its global id only."""
    rng = np.random.default_rng([seed, 0xD17, sample_id, clip])
    return rng.standard_normal(shape).astype(np.float32), np.float32(rng.uniform(0.0, 1.0))


def collate(microbatches: Sequence[Sequence[Sample]], cfg: TrainConfig, seed: int) -> dict[str, np.ndarray]:
    m, d = cfg.model, cfg.data
    M, S = len(microbatches), d.seq_len
    a = {
        "tokens": np.full((M, S), PAD, np.int32),
        "targets": np.full((M, S), PAD, np.int32),
        "loss_mask": np.zeros((M, S), np.float32),
        "segment_ids": np.zeros((M, S), np.int32),
        "positions": np.zeros((M, S), np.int32),
    }
    if m.vision is not None:
        v = m.vision
        a["images"] = np.zeros((M, d.max_images, v.image_size, v.image_size, v.channels), np.float32)
        a["image_pos"] = np.full((M, d.max_images, v.tokens_per_image), S, np.int32)
    if m.audio is not None:
        au = m.audio
        a["audio"] = np.zeros((M, d.max_audio_clips, au.frames_per_clip, au.mel_bins), np.float32)
        a["audio_pos"] = np.full((M, d.max_audio_clips, au.tokens_per_clip), S, np.int32)
    if m.dit is not None:
        dt, nv = m.dit, d.max_video_clips
        a["latents"] = np.zeros((M, nv, dt.tokens_per_clip, dt.latent_channels), np.float32)
        a["noise"] = np.zeros_like(a["latents"])
        a["t"] = np.zeros((M, nv), np.float32)
        a["cond_idx"] = np.zeros((M, nv, dt.cond_tokens), np.int32)
        a["cond_mask"] = np.zeros((M, nv, dt.cond_tokens), bool)
        a["video_valid"] = np.zeros((M, nv), np.float32)
    n_clips = 0
    for i, mb in enumerate(microbatches):
        off, ni, na, nv = 0, 0, 0, 0
        for seg, s in enumerate(mb, start=1):
            L = len(s)
            if off + L > S:
                raise ValueError(f"microbatch {i} overflows seq_len={S}")
            sl = slice(off, off + L)
            a["tokens"][i, sl] = s.tokens
            a["targets"][i, off:off + L - 1] = s.tokens[1:]
            a["loss_mask"][i, off:off + L - 1] = s.labels[1:]
            a["segment_ids"][i, sl] = seg
            a["positions"][i, sl] = np.arange(L)
            ni = _place(a, "images", "image_pos", i, ni, s.images, off + np.flatnonzero(s.tokens == IMG))
            na = _place(a, "audio", "audio_pos", i, na, s.audio, off + np.flatnonzero(s.tokens == AUD))
            if s.video is not None and len(s.video):
                lc = m.dit.cond_tokens
                cap = off + s.caption[:lc]
                for c, lat in enumerate(s.video):
                    a["latents"][i, nv] = lat
                    a["noise"][i, nv], a["t"][i, nv] = noise_for(seed, s.sample_id, c, lat.shape)
                    a["cond_idx"][i, nv, :len(cap)] = cap
                    a["cond_mask"][i, nv, :len(cap)] = True
                    a["video_valid"][i, nv] = 1.0
                    nv += 1
                n_clips += len(s.video)
            off += L
    a["n_tokens"] = np.float32(max(1.0, a["loss_mask"].sum()))
    a["n_clips"] = np.float32(max(1, n_clips))
    return a


def _place(a, key, pos_key, row, used, items, positions) -> int:
    """Put a sample's encoder inputs after the `used` ones of microbatch `row`, with the sequence
    positions of their placeholder tokens; returns the new count."""
    if items is None or not len(items):
        return used
    k = len(items)
    a[key][row, used:used + k] = items
    a[pos_key][row, used:used + k] = positions.reshape(k, -1)
    return used + k
