"""Synthetic multimodal samples whose composition follows the paper's statistics.

Kinds (mixture weights from DataConfig): image-caption pairs (~16 text tokens per image),
interleaved documents (heavy-tailed, log-normal text tokens per image), audio clips with a
transcript, and video clips (up to `video_seconds_max`) with a caption for the dit.
Content is learnable: each sample has a class whose prototype shapes its images, audio and
video, whose word appears in the text, and the text follows a fixed sparse Markov chain.
"""
from __future__ import annotations

import math

import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import AUD, BOS, EOS, IMG, WORD0, Sample, SampleMeta
from dip_jax.data.packing import Budget

N_CLASSES = 10


class SyntheticSamples:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.budget = Budget.from_config(cfg)
        m, d = cfg.model, cfg.data
        rng = np.random.default_rng([d.seed, 0x5EED])
        self.first_word = WORD0 + N_CLASSES
        n_words = m.llm.vocab_size - self.first_word
        if n_words < 4:
            raise ValueError("model.llm.vocab_size too small for synthetic text")
        self.successors = self.first_word + rng.integers(0, n_words, size=(m.llm.vocab_size, 2))
        self.image_proto = (rng.standard_normal((N_CLASSES, m.vision.image_size, m.vision.image_size,
                                                 m.vision.channels)).astype(np.float32)
                            if m.vision is not None else None)
        self.audio_proto = (rng.standard_normal((N_CLASSES, m.audio.frames_per_clip, m.audio.mel_bins))
                            .astype(np.float32) if m.audio is not None else None)
        self.video_proto = (rng.standard_normal((N_CLASSES, m.dit.tokens_per_clip, m.dit.latent_channels))
                            .astype(np.float32) if m.dit is not None else None)
        kinds = [("caption", d.mix_caption if m.vision is not None and d.max_images else 0.0),
                 ("interleaved", d.mix_interleaved if m.vision is not None and d.max_images else 0.0),
                 ("audio", d.mix_audio if m.audio is not None and d.max_audio_clips else 0.0),
                 ("video", d.mix_video if m.dit is not None and d.max_video_clips else 0.0)]
        self.kinds = [k for k, _ in kinds]
        w = np.array([x for _, x in kinds], float)
        self.weights = w / w.sum() if w.sum() > 0 else None   # None: text only

    # -- pieces ----------------------------------------------------------------------------
    def _text(self, rng, n: int, cls: int | None) -> list[int]:
        out = [] if cls is None else [WORD0 + cls]
        tok = int(rng.integers(self.first_word, self.cfg.model.llm.vocab_size))
        while len(out) < n:
            out.append(tok)
            tok = int(self.successors[tok, rng.integers(0, 2)])
        return out[:n]

    def _image(self, rng, cls):
        return self.image_proto[cls] + 0.5 * rng.standard_normal(self.image_proto.shape[1:]).astype(np.float32)

    # -- sample kinds ------------------------------------------------------------------------
    def sample(self, rng, sample_id: int) -> Sample:
        kind = "text_only" if self.weights is None else self.kinds[rng.choice(len(self.kinds), p=self.weights)]
        return getattr(self, f"_{kind}")(rng, sample_id)

    def _finish(self, pieces, sample_id, images=None, audio=None, video=None, caption_from=None) -> Sample:
        """pieces: list of (token list, is_label). Truncates text so the sample fits alone."""
        b = self.budget
        text_room = b.seq_len - 2 - sum(len(t) for t, lab in pieces if lab == "placeholder")
        tokens, labels = [BOS], [False]
        for toks, lab in pieces:
            if lab != "placeholder":
                toks = toks[:max(0, text_room)]
                text_room -= len(toks)
            tokens += toks
            labels += [lab is True] * len(toks)
        tokens = np.asarray(tokens + [EOS], np.int32)
        labels = np.asarray(labels + [True], bool)
        text = int(np.sum((tokens != IMG) & (tokens != AUD)))
        n_img = 0 if images is None else len(images)
        a_sec = 0.0 if audio is None else audio[1]
        v_sec = 0.0 if video is None else video[1]
        caption = None
        if video is not None:
            caption = np.flatnonzero((tokens != IMG) & (tokens != AUD) & (np.arange(len(tokens)) > 0))
        return Sample(tokens, labels, SampleMeta(text, n_img, a_sec, v_sec), sample_id,
                      images=images, audio=None if audio is None else audio[0],
                      video=None if video is None else video[0], caption=caption)

    def _text_only(self, rng, sample_id):
        return self._finish([(self._text(rng, int(rng.integers(8, self.budget.seq_len // 2)), None), True)],
                            sample_id)

    def _caption(self, rng, sample_id):
        cls = int(rng.integers(N_CLASSES))
        n = max(2, int(rng.poisson(self.cfg.data.caption_tokens_per_image)))
        img_tokens = [IMG] * self.budget.tokens_per_image
        return self._finish([(img_tokens, "placeholder"), (self._text(rng, n, cls), True)], sample_id,
                            images=self._image(rng, cls)[None])

    def _interleaved(self, rng, sample_id):
        d, b = self.cfg.data, self.budget
        n_img = int(min(d.interleaved_max_images, b.max_images, rng.geometric(0.45)))
        n_img = max(1, min(n_img, (b.seq_len - 2) // (b.tokens_per_image + 1)))
        pieces, images = [], []
        room = b.seq_len - 2 - n_img * b.tokens_per_image
        for _ in range(n_img):
            cls = int(rng.integers(N_CLASSES))
            n = int(np.clip(rng.lognormal(math.log(d.interleaved_tokens_per_image_median),
                                          d.interleaved_tokens_per_image_sigma), 1, 3115))
            n = max(1, min(n, room // n_img))
            pieces += [([IMG] * b.tokens_per_image, "placeholder"), (self._text(rng, n, cls), True)]
            images.append(self._image(rng, cls))
        return self._finish(pieces, sample_id, images=np.stack(images))

    def _audio(self, rng, sample_id):
        d, b = self.cfg.data, self.budget
        max_clips = max(1, min(b.max_audio_clips, (b.seq_len - 8) // max(1, b.tokens_per_audio_clip)))
        seconds = float(np.round(rng.uniform(0.2, min(d.audio_seconds_max, max_clips * b.audio_clip_seconds)), 2))
        clips = b.audio_clips(SampleMeta(audio_seconds=seconds))
        cls = int(rng.integers(N_CLASSES))
        frames = self.audio_proto[cls] + 0.5 * rng.standard_normal((clips, *self.audio_proto.shape[1:]))
        n = max(2, int(rng.poisson(4 * seconds)))
        return self._finish([([AUD] * (clips * b.tokens_per_audio_clip), "placeholder"),
                             (self._text(rng, n, cls), True)], sample_id,
                            audio=(frames.astype(np.float32), seconds))

    def _video(self, rng, sample_id):
        d, b = self.cfg.data, self.budget
        seconds = float(np.round(rng.uniform(0.5, min(d.video_seconds_max, b.max_video_clips * b.video_clip_seconds)), 2))
        clips = b.video_clips(SampleMeta(video_seconds=seconds))
        cls = int(rng.integers(N_CLASSES))
        lat = self.video_proto[cls] + 0.1 * rng.standard_normal((clips, *self.video_proto.shape[1:]))
        n = max(2, int(rng.poisson(self.cfg.data.caption_tokens_per_image)))
        return self._finish([(self._text(rng, n, cls), True)], sample_id, video=(lat.astype(np.float32), seconds))
