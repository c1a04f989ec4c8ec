"""Runtime halves of the built-in module specs (their planner halves: dip_jax/specs/builtin.py)."""
from __future__ import annotations

import jax.numpy as jnp

from dip_jax.models.audio import AudioEncoder
from dip_jax.models.dit import DiT
from dip_jax.models.llm import LLM as _LLM
from dip_jax.models.losses import flow_loss_sum, flow_targets, lm_loss_sum
from dip_jax.models.vit import ViT
from dip_jax.specs.runtime import ModuleRuntime

LLM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
CLIP_KEYS = ("latents", "noise", "t", "cond_idx", "cond_mask", "video_valid")


def _llm_inputs(b, merges):
    return {"tokens": b["tokens"], "segment_ids": b["segment_ids"], "positions": b["positions"], "merges": merges}


def _llm_loss(head_out, b, batch):
    hidden, logits = head_out
    return hidden, lm_loss_sum(logits, b["targets"], b["loss_mask"]) / batch["n_tokens"]


def _dit_inputs(b, cond):
    x_t, target = flow_targets(b["latents"], b["noise"], b["t"])
    return {"x_t": x_t, "t": b["t"], "cond": cond, "cond_mask": b["cond_mask"]}, target


def _dit_loss(pred, target, b, batch):
    return flow_loss_sum(pred, target, b["video_valid"]) / batch["n_clips"]


VISION = ModuleRuntime(
    build=lambda m, cfg, d, rngs, dtype: ViT(cfg, d, rngs, dtype, m.attention),
    example_input=lambda m, u, seq_len, make: make((u, m.vision.image_size, m.vision.image_size, m.vision.channels),
                                                  jnp.float32))

AUDIO = ModuleRuntime(
    build=lambda m, cfg, d, rngs, dtype: AudioEncoder(cfg, d, rngs, dtype, m.attention),
    example_input=lambda m, u, seq_len, make: make((u, m.audio.frames_per_clip, m.audio.mel_bins), jnp.float32))

LLM = ModuleRuntime(
    build=lambda m, cfg, d, rngs, dtype: _LLM(cfg, rngs, dtype, m.attention),
    example_input=lambda m, u, seq_len, make: {
        "tokens": make((1, seq_len), jnp.int32), "segment_ids": jnp.ones((1, seq_len), jnp.int32),
        "positions": jnp.arange(seq_len, dtype=jnp.int32)[None], "merges": ()},
    batch_keys=LLM_KEYS, inputs=_llm_inputs, loss=_llm_loss, loss_name="lm_loss", scalars=("n_tokens",))

DIT = ModuleRuntime(
    build=lambda m, cfg, d, rngs, dtype: DiT(cfg, d, rngs, dtype, m.attention),
    example_input=lambda m, u, seq_len, make: {
        "x_t": make((u, m.dit.tokens_per_clip, m.dit.latent_channels), jnp.float32),
        "t": jnp.full((u,), 0.5, jnp.float32), "cond": make((u, m.dit.cond_tokens, m.llm.dim), jnp.float32),
        "cond_mask": jnp.ones((u, m.dit.cond_tokens), bool)},
    batch_keys=CLIP_KEYS, inputs=_dit_inputs, loss=_dit_loss, cond_key="cond_idx",
    loss_weight=lambda m: m.dit_loss_weight, loss_name="dit_loss", scalars=("n_clips",))
