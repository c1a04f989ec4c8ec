"""The large multimodal model: a module graph encoders -> llm -> optional dit.

Encoder outputs (already projected to the llm width) replace placeholder tokens in the text
sequence; the dit conditions on the llm hidden states of its clip's caption. Loss normalisers
(`n_tokens`, `n_clips`) come with the batch, computed on the host over the global batch, so a
pipelined execution that adds microbatch by microbatch gets exactly the same loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dip_jax.config import ModelConfig
from dip_jax.models.audio import AudioEncoder
from dip_jax.models.dit import DiT
from dip_jax.models.llm import LLM
from dip_jax.models.vit import ViT


def lm_loss_sum(logits, targets, mask):
    """Sum of token cross-entropies over `mask` (float)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask)


def flow_targets(latents, noise, t):
    """Rectified flow: x_t = t*x1 + (1-t)*noise, velocity target x1 - noise."""
    tt = t[..., None, None]
    return tt * latents + (1.0 - tt) * noise, latents - noise


def flow_loss_sum(pred, target, valid):
    """Sum over clips of the per-clip mean squared velocity error, masked by `valid`."""
    per_clip = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=(-2, -1))
    return jnp.sum(per_clip * valid)


def gather_condition(hidden, cond_idx):
    """hidden [M, S, D], cond_idx [M, NV, Lc] -> [M, NV, Lc, D]."""
    return jax.vmap(lambda h, i: h[i])(hidden, cond_idx)


def _flat(x, lead: int = 2):
    return x.reshape(-1, *x.shape[lead:])


class LMM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dtype = cfg.llm.dim, jnp.dtype(cfg.compute_dtype)
        self.vision = ViT(cfg.vision, d, rngs, dtype) if cfg.vision is not None else None
        self.audio = AudioEncoder(cfg.audio, d, rngs, dtype) if cfg.audio is not None else None
        self.llm = LLM(cfg.llm, rngs, dtype)
        self.dit = DiT(cfg.dit, d, rngs, dtype) if cfg.dit is not None else None

    def merges(self, batch):
        """Encoder outputs and their placeholder positions, per microbatch."""
        out = []
        for enc, x_key, pos_key in ((self.vision, "images", "image_pos"), (self.audio, "audio", "audio_pos")):
            if enc is None or batch[x_key].shape[1] == 0:
                continue
            m, n = batch[x_key].shape[:2]
            y = enc(_flat(batch[x_key]))                      # [M*N, t, D]
            out.append((y.reshape(m, n * y.shape[1], -1), batch[pos_key].reshape(m, -1)))
        return tuple(out)

    def __call__(self, batch):
        """Returns (loss, {"lm_loss", "dit_loss"})."""
        hidden, logits = self.llm({"tokens": batch["tokens"], "segment_ids": batch["segment_ids"],
                                   "positions": batch["positions"], "merges": self.merges(batch)})
        lm = lm_loss_sum(logits, batch["targets"], batch["loss_mask"]) / batch["n_tokens"]
        aux = {"lm_loss": lm}
        loss = lm
        if self.dit is not None and batch["latents"].shape[1] > 0:
            x_t, v = flow_targets(batch["latents"], batch["noise"], batch["t"])
            cond = gather_condition(hidden, batch["cond_idx"])
            pred = self.dit({"x_t": _flat(x_t), "t": batch["t"].reshape(-1), "cond": _flat(cond),
                             "cond_mask": _flat(batch["cond_mask"])})
            dit = flow_loss_sum(pred, _flat(v), batch["video_valid"].reshape(-1)) / batch["n_clips"]
            aux["dit_loss"] = dit
            loss = loss + self.cfg.dit_loss_weight * dit
        return loss, aux

    def greedy_logits(self, batch):
        """Logits of every position (for teacher-forced or greedy evaluation)."""
        return self.llm({"tokens": batch["tokens"], "segment_ids": batch["segment_ids"],
                         "positions": batch["positions"], "merges": self.merges(batch)})[1]


def build_model(cfg: ModelConfig, seed: int = 0) -> LMM:
    return LMM(cfg, nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> LMM:
    """Shapes only: nothing is allocated (works for the paper-size configs)."""
    return nnx.eval_shape(lambda: LMM(cfg, nnx.Rngs(0)))


def module_param_counts(model: LMM) -> dict[str, int]:
    state = nnx.state(model, nnx.Param)
    return {name: sum(int(x.size) for x in jax.tree.leaves(state[name]))
            for name in ("vision", "audio", "llm", "dit") if getattr(model, name) is not None}
