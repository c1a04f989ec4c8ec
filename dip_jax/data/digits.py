"""A real task on real images: read the handwritten digits (scikit-learn's 8x8 set) in order.

Each sample shows 0..digits_max_images digit images, each after its ordinal marker, then a
question; the answer is, for each image in order, its ordinal marker followed by the digit:

    BOS  #1 <img>  #2 <img> ...  Q  #1 d1  #2 d2 ...  EOS

Only the digits and EOS are labels. The images are split 80/20 with a fixed seed; evaluation
samples are built only from the held-out 20%.
"""
from __future__ import annotations

import functools

import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import BOS, DIGIT0, EOS, IMG, ORDINAL0, QUESTION, Sample, SampleMeta

SPLIT_SEED = 20240917


@functools.lru_cache(maxsize=1)
def _load():
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]        # [1797, 8, 8, 1]
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    cut = int(round(0.8 * len(images)))
    return images, d.target.astype(np.int32), perm[:cut], perm[cut:]


def split_indices(split: str) -> np.ndarray:
    _, _, train, held_out = _load()
    return {"train": train, "eval": held_out}[split]


class DigitSamples:
    def __init__(self, cfg: TrainConfig, split: str):
        self.cfg, self.split = cfg, split
        self.images, self.labels, *_ = _load()
        self.pool = split_indices(split)
        self.t = cfg.model.vision.tokens_per_image

    def sample(self, rng, sample_id: int) -> Sample:
        k = int(rng.integers(0, self.cfg.data.digits_max_images + 1))
        idx = rng.choice(self.pool, size=k, replace=True)
        digits = self.labels[idx]
        prompt, answer = [BOS], [QUESTION]
        for i in range(k):
            prompt += [ORDINAL0 + i] + [IMG] * self.t
            answer += [ORDINAL0 + i, DIGIT0 + int(digits[i])]
        tokens = np.asarray(prompt + answer + [EOS], np.int32)
        labels = (tokens >= DIGIT0) & (tokens < DIGIT0 + 10) | (tokens == EOS)
        labels[:len(prompt)] = False
        meta = SampleMeta(text_tokens=3 * k + 3, images=k)
        return Sample(tokens, labels, meta, sample_id, images=self.images[idx])
