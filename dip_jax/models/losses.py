"""The losses of the built-in modules, as sums (normalised by the caller over the global batch)."""
from __future__ import annotations

import jax.numpy as jnp
import optax


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
