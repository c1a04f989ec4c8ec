"""The four built-in module specs: vision and audio encoders, the llm backbone, the dit generator."""
from __future__ import annotations

import numpy as np

from dip_jax.specs.params import attention_params
from dip_jax.specs.registry import BACKBONE, ENCODER, GENERATOR, EncoderItems, ModuleSpec, clips, register
from dip_jax.specs.tokens import AUD, IMG


def noise_for(seed: int, sample_id: int, clip: int, shape) -> tuple[np.ndarray, np.float32]:
    """Diffusion noise and timestep of one clip, a function of its global id only."""
    rng = np.random.default_rng([seed, 0xD17, sample_id, clip])
    return rng.standard_normal(shape).astype(np.float32), np.float32(rng.uniform(0.0, 1.0))


class ClipCollate:
    """The dit's batch arrays: latents/noise [M, NV, T, C], t [M, NV], cond_idx/cond_mask
    [M, NV, Lc] (the caption's sequence positions), video_valid [M, NV]; n_clips (global)."""

    def init(self, model, data, M: int, S: int) -> dict:
        dt, nv = model.dit, data.max_video_clips
        lat = np.zeros((M, nv, dt.tokens_per_clip, dt.latent_channels), np.float32)
        return {"latents": lat, "noise": np.zeros_like(lat), "t": np.zeros((M, nv), np.float32),
                "cond_idx": np.zeros((M, nv, dt.cond_tokens), np.int32),
                "cond_mask": np.zeros((M, nv, dt.cond_tokens), bool), "video_valid": np.zeros((M, nv), np.float32)}

    def place(self, a: dict, row: int, used: int, sample, offset: int, seed: int, model) -> int:
        if sample.video is None or not len(sample.video):
            return used
        cap = offset + sample.caption[:model.dit.cond_tokens]
        for c, lat in enumerate(sample.video):
            a["latents"][row, used] = lat
            a["noise"][row, used], a["t"][row, used] = noise_for(seed, sample.sample_id, c, lat.shape)
            a["cond_idx"][row, used, :len(cap)] = cap
            a["cond_mask"][row, used, :len(cap)] = True
            a["video_valid"][row, used] = 1.0
            used += 1
        return used

    def finish(self, a: dict) -> None:
        a["n_clips"] = np.float32(max(1.0, a["video_valid"].sum()))


VISION = register(ModuleSpec(
    "vision", ENCODER, "dip_jax.models.builtin:VISION",
    items=lambda meta, cfg: meta.images, capacity=lambda data, cfg: data.max_images,
    tokens_per_item=lambda cfg: cfg.tokens_per_image, layer_tokens=lambda cfg, seq_len: cfg.patches,
    head_tokens=lambda cfg, n: n // (cfg.spatial_merge ** 2),
    encoder_items=EncoderItems("images", "image_pos", IMG, "images",
                               lambda cfg: (cfg.image_size, cfg.image_size, cfg.channels)),
    color="#4c9be8"))

AUDIO = register(ModuleSpec(
    "audio", ENCODER, "dip_jax.models.builtin:AUDIO",
    items=lambda meta, cfg: clips(meta.audio_seconds, cfg.clip_seconds),
    capacity=lambda data, cfg: data.max_audio_clips,
    tokens_per_item=lambda cfg: cfg.tokens_per_clip, layer_tokens=lambda cfg, seq_len: cfg.tokens_per_clip,
    encoder_items=EncoderItems("audio", "audio_pos", AUD, "audio", lambda cfg: (cfg.frames_per_clip, cfg.mel_bins)),
    color="#9b6ad6"))

LLM = register(ModuleSpec(
    "llm", BACKBONE, "dip_jax.models.builtin:LLM",
    head_params=lambda cfg, d: cfg.head_params(), embed_is_matmul=False, causal=True, color="#f0a03c"))

DIT = register(ModuleSpec(
    "dit", GENERATOR, "dip_jax.models.builtin:DIT",
    items=lambda meta, cfg: clips(meta.video_seconds, cfg.clip_seconds),
    capacity=lambda data, cfg: data.max_video_clips, layer_tokens=lambda cfg, seq_len: cfg.tokens_per_clip,
    embed_params=lambda cfg, d: cfg.embed_params(d), head_params=lambda cfg, d: cfg.head_params(),
    layer_extra_params=lambda cfg: attention_params(cfg.dim, cfg.heads, cfg.kv_heads) + 6 * cfg.dim * cfg.dim,
    cross_tokens=lambda cfg: cfg.cond_tokens,
    carry_width=lambda cfg: cfg.dim + cfg.cond_tokens * cfg.dim / cfg.tokens_per_clip,
    collate=ClipCollate(), color="#4fb286"))
