"""Synthetic multimodal samples whose composition follows the paper's statistics.

Kinds (mixture weights from DataConfig): image-caption pairs (~16 text tokens per image),
interleaved documents (heavy-tailed, log-normal text tokens per image), audio clips with a
transcript, and video clips (up to `video_seconds_max`) with a caption for the dit.

A sample's layout (kind, lengths, counts) is drawn from the stream's generator; its content
(classes, tokens, pixels) from a generator of its own id. So the metadata of a stream is the same
with or without content, and `content=False` gives the planner a batch's metadata cheaply.
Content is learnable: a class per image / clip shapes its pixels, audio or latents and its word
opens the following text, which then follows a fixed sparse Markov chain.
"""
from __future__ import annotations

import math

import numpy as np

from dip_jax.config import TrainConfig
from dip_jax.data.metadata import AUD, BOS, EOS, IMG, WORD0, Sample, SampleMeta
from dip_jax.data.packing import Budget

N_CLASSES = 10


class SyntheticSamples:
    def __init__(self, cfg: TrainConfig, content: bool = True):
        self.cfg, self.content = cfg, content
        self.budget = b = Budget.from_config(cfg)
        m, d = cfg.model, cfg.data
        self.first_word = WORD0 + N_CLASSES
        if m.llm.vocab_size - self.first_word < 4:
            raise ValueError("model.llm.vocab_size too small for synthetic text")
        if content:
            rng = np.random.default_rng([d.seed, 0x5EED])
            self.successors = self.first_word + rng.integers(0, m.llm.vocab_size - self.first_word,
                                                             size=(m.llm.vocab_size, 2))
            proto = lambda *shape: rng.standard_normal((N_CLASSES, *shape)).astype(np.float32)
            v, a, t = m.vision, m.audio, m.dit
            self.image_proto = proto(v.image_size, v.image_size, v.channels) if v is not None else None
            self.audio_proto = proto(a.frames_per_clip, a.mel_bins) if a is not None else None
            self.video_proto = proto(t.tokens_per_clip, t.latent_channels) if t is not None else None
        kinds = [("caption", d.mix_caption if b.max_images else 0.0),
                 ("interleaved", d.mix_interleaved if b.max_images else 0.0),
                 ("speech", d.mix_audio if b.max_audio_clips else 0.0),
                 ("video", d.mix_video if b.max_video_clips else 0.0)]
        self.kinds = [k for k, _ in kinds]
        w = np.array([x for _, x in kinds], float)
        self.weights = w / w.sum() if w.sum() > 0 else None   # None: text only

    def sample(self, rng, sample_id: int) -> Sample:
        kind = "text_only" if self.weights is None else self.kinds[rng.choice(len(self.kinds), p=self.weights)]
        pieces, video_seconds = getattr(self, f"_{kind}")(rng)
        return self._build(pieces, sample_id, video_seconds)

    # -- layouts: lists of ("img", n_images) / ("aud", clips, seconds) / ("text", tokens) ----
    def _text_only(self, rng):
        return [("text", int(rng.integers(8, self.budget.seq_len // 2)))], 0.0

    def _caption(self, rng):
        n = max(2, int(rng.poisson(self.cfg.data.caption_tokens_per_image)))
        return [("img", 1), ("text", n)], 0.0

    def _interleaved(self, rng):
        d, b = self.cfg.data, self.budget
        n_img = int(min(d.interleaved_max_images, b.max_images, rng.geometric(0.45)))
        n_img = max(1, min(n_img, (b.seq_len - 2) // (b.tokens_per_image + 1)))
        room = b.seq_len - 2 - n_img * b.tokens_per_image
        pieces = []
        for _ in range(n_img):
            n = int(np.clip(rng.lognormal(math.log(d.interleaved_tokens_per_image_median),
                                          d.interleaved_tokens_per_image_sigma), 1, 3115))
            pieces += [("img", 1), ("text", max(1, min(n, room // n_img)))]
        return pieces, 0.0

    def _speech(self, rng):
        d, b = self.cfg.data, self.budget
        max_clips = max(1, min(b.max_audio_clips, (b.seq_len - 8) // max(1, b.tokens_per_audio_clip)))
        seconds = float(np.round(rng.uniform(0.2, min(d.audio_seconds_max, max_clips * b.audio_clip_seconds)), 2))
        clips = b.audio_clips(SampleMeta(audio_seconds=seconds))
        return [("aud", clips, seconds), ("text", max(2, int(rng.poisson(4 * seconds))))], 0.0

    def _video(self, rng):
        d, b = self.cfg.data, self.budget
        seconds = float(np.round(rng.uniform(0.5, min(d.video_seconds_max, b.max_video_clips * b.video_clip_seconds)), 2))
        return [("text", max(2, int(rng.poisson(d.caption_tokens_per_image))))], seconds

    # -- layout -> sample ---------------------------------------------------------------------
    def _build(self, pieces, sample_id: int, video_seconds: float) -> Sample:
        b = self.budget
        text_room = b.seq_len - 2 - sum(p[1] * b.tokens_per_image if p[0] == "img" else
                                        p[1] * b.tokens_per_audio_clip for p in pieces if p[0] != "text")
        fitted = []
        for p in pieces:                                 # truncate text so the sample fits alone
            if p[0] == "text":
                p = ("text", min(p[1], max(0, text_room)))
                text_room -= p[1]
            fitted.append(p)
        n_img = sum(p[1] for p in fitted if p[0] == "img")
        audio_seconds = float(sum(p[2] for p in fitted if p[0] == "aud"))
        text = 2 + sum(p[1] for p in fitted if p[0] == "text")
        meta = SampleMeta(text, n_img, audio_seconds, video_seconds)
        if not self.content:
            return Sample(np.zeros(0, np.int32), np.zeros(0, bool), meta, sample_id)
        rng = np.random.default_rng([self.cfg.data.seed, 0xC0, sample_id])
        tokens, labels, images, audio = [BOS], [False], [], []
        cls = int(rng.integers(N_CLASSES))
        for p in fitted:
            if p[0] == "img":
                cls = int(rng.integers(N_CLASSES))
                images.append(self.image_proto[cls] + 0.5 * rng.standard_normal(self.image_proto.shape[1:]))
                tokens += [IMG] * b.tokens_per_image
                labels += [False] * b.tokens_per_image
            elif p[0] == "aud":
                cls = int(rng.integers(N_CLASSES))
                audio += list(self.audio_proto[cls] + 0.5 * rng.standard_normal((p[1], *self.audio_proto.shape[1:])))
                tokens += [AUD] * (p[1] * b.tokens_per_audio_clip)
                labels += [False] * (p[1] * b.tokens_per_audio_clip)
            else:
                tokens += self._words(rng, p[1], cls)
                labels += [True] * p[1]
        tokens, labels = np.asarray(tokens + [EOS], np.int32), np.asarray(labels + [True], bool)
        video = caption = None
        clips = b.video_clips(meta)
        if clips:
            video = (self.video_proto[cls] + 0.1 * rng.standard_normal((clips, *self.video_proto.shape[1:])))
            video = video.astype(np.float32)
            caption = np.flatnonzero((tokens != IMG) & (tokens != AUD) & (np.arange(len(tokens)) > 0))
        as_array = lambda xs: np.stack(xs).astype(np.float32) if xs else None
        return Sample(tokens, labels, meta, sample_id, images=as_array(images), audio=as_array(audio),
                      video=video, caption=caption)

    def _words(self, rng, n: int, cls: int) -> list[int]:
        if n <= 0:
            return []
        out = [WORD0 + cls]
        tok = int(rng.integers(self.first_word, self.cfg.model.llm.vocab_size))
        steps = rng.integers(0, 2, size=n)
        while len(out) < n:
            out.append(tok)
            tok = int(self.successors[tok, steps[len(out) - 1]])
        return out
