"""What a planner sees of a sample before it runs: one dataclass used everywhere."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Iterator

import numpy as np

from dip_jax.specs.tokens import AUD, BOS, DIGIT0, EOS, IMG, N_ORDINALS, ORDINAL0, PAD, QUESTION, WORD0  # noqa: F401


BUILTIN_KEYS = ("text_tokens", "images", "audio_seconds", "video_seconds")


@dataclasses.dataclass(frozen=True)
class SampleMeta:
    text_tokens: int = 0
    images: int = 0
    audio_seconds: float = 0.0
    video_seconds: float = 0.0
    # counts of module types registered beyond the built-in ones: ((metadata key, value), ...)
    extra: tuple[tuple[str, float], ...] = ()

    def get(self, key: str, default=0):
        """A built-in field or an `extra` count."""
        if key in BUILTIN_KEYS:
            return getattr(self, key)
        return dict(self.extra).get(key, default)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in BUILTIN_KEYS}
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SampleMeta":
        """Strict: counts are non-negative integers, durations non-negative finite numbers; a
        silently coerced "3" or 2.5 images would plan a batch that is not the data."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        from dip_jax import specs
        extra_keys = specs.metadata_keys()
        unknown = set(d) - set(BUILTIN_KEYS) - set(extra_keys)
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
        for key in ("text_tokens", "images"):
            v = d.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"key {key!r}: expected a non-negative integer count, got {v!r}")
        for key in ("audio_seconds", "video_seconds"):
            v = d.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"key {key!r}: expected a non-negative finite number of seconds, got {v!r}")
        extra = []
        for key in extra_keys:
            if key in d:
                v = d[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"key {key!r}: expected a non-negative finite number, got {v!r}")
                extra.append((key, v))
        return cls(d.get("text_tokens", 0), d.get("images", 0), float(d.get("audio_seconds", 0.0)),
                   float(d.get("video_seconds", 0.0)), tuple(extra))


def read_metadata_jsonl(path) -> Iterator[SampleMeta]:
    """Errors name the file, the line and the key."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield SampleMeta.from_json(json.loads(line))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: {e}".splitlines()[0]) from None


@dataclasses.dataclass
class Sample:
    """One training sample: text with placeholder tokens plus its modality content.

    `tokens` holds IMG / AUD placeholders where encoder outputs go (tokens_per_image per image,
    tokens_per_clip per audio clip, in order). `labels[j]` says token j is predicted (loss).
    `caption` is the text the dit conditions on (indices into `tokens`).
    """

    tokens: np.ndarray                 # int32 [L]
    labels: np.ndarray                 # bool [L]
    meta: SampleMeta
    sample_id: int
    images: np.ndarray | None = None   # [n, H, W, C]
    audio: np.ndarray | None = None    # [clips, frames, mel]
    video: np.ndarray | None = None    # [clips, tokens, channels] latents
    caption: np.ndarray | None = None  # int32 indices into tokens
    extra: dict = dataclasses.field(default_factory=dict)   # inputs of extra module types, by field name

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def metas(samples: Iterable[Sample]) -> list[SampleMeta]:
    return [s.meta for s in samples]
