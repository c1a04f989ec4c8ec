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
from dip_jax import specs
from dip_jax.data.metadata import PAD, Sample, SampleMeta


@dataclasses.dataclass
class Batch:
    arrays: dict[str, np.ndarray]
    metadata: tuple[tuple[SampleMeta, ...], ...]   # per microbatch, per sample
    index: int = 0                                 # position in the stream
    oversize: tuple[int, int] = (0, 0)             # samples (truncated, skipped) by data.oversize
    epoch: int | None = None                       # the files task: the epoch of its newest record
    records_skipped: dict = dataclasses.field(default_factory=dict)   # decode failures by reason
    wait_seconds: float = 0.0                      # how long the step loop waited for it
    rows: tuple[int, ...] | None = None            # the microbatches built (None: all; the others are zeros)
    decoded: tuple = ()                            # the files task: the records decoded, as (epoch, file:line)
    failed: tuple = ()                             # the files task: (microbatch, reason) per decode failure


def collate(microbatches: Sequence[Sequence[Sample]], cfg: TrainConfig, seed: int,
            placeholders: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """`placeholders`: an encoder's placeholder id by its input key, where the data's ids are not
    the spec's (a real tokenizer's)."""
    m, d = cfg.model, cfg.data
    placeholders = placeholders or {}
    M, S = len(microbatches), d.seq_len
    a = {
        "tokens": np.full((M, S), PAD, np.int32),
        "targets": np.full((M, S), PAD, np.int32),
        "loss_mask": np.zeros((M, S), np.float32),
        "segment_ids": np.zeros((M, S), np.int32),
        "positions": np.zeros((M, S), np.int32),
    }
    encoders, others = [], []
    for name in m.modules:
        spec, sub = specs.get(name), m.module(name)
        if spec.encoder_items is not None:
            e = spec.encoder_items
            n = spec.capacity(d, sub)
            a[e.input_key] = np.zeros((M, n, *e.item_shape(sub)), np.float32)
            a[e.positions_key] = np.full((M, n, spec.tokens_per_item(sub)), S, np.int32)
            encoders.append((e, placeholders.get(e.input_key, e.placeholder)))
        elif spec.collate is not None:
            a.update(spec.collate.init(m, d, M, S))
            others.append(spec.collate)
    for i, mb in enumerate(microbatches):
        off = 0
        used = [0] * (len(encoders) + len(others))
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
            for k, (e, placeholder) in enumerate(encoders):
                f = e.sample_field          # an extra module's inputs are in `extra`, the built-ins' are fields
                items = s.extra[f] if f in s.extra else getattr(s, f, None)
                used[k] = _place(a, e.input_key, e.positions_key, i, used[k], items,
                                 off + np.flatnonzero(s.tokens == placeholder))
            for k, c in enumerate(others, start=len(encoders)):
                used[k] = c.place(a, i, used[k], s, off, seed, m)
            off += L
    a["n_tokens"] = np.float32(max(1.0, a["loss_mask"].sum()))
    for c in others:
        c.finish(a)
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
