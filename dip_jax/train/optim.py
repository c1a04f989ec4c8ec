"""optax optimizer with per-module learning-rate multipliers and frozen modules."""
from __future__ import annotations

import jax
import optax

from dip_jax.config import OptimConfig
from dip_jax.train.nonfinite import skip_nonfinite


def lr_schedule(cfg: OptimConfig, total_steps: int):
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, max(1, cfg.warmup_steps)) if cfg.warmup_steps else cfg.lr
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(1, cfg.warmup_steps), max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.end_lr_fraction)


def module_of(path) -> str:
    """The module a parameter belongs to: the first key of its path."""
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", k)))


def module_labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: module_of(p), params)


def clip_by_global_norm(max_norm: float, global_norm) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (same arithmetic) with the norm computed by `global_norm`."""

    def update(updates, state, params=None):
        g = global_norm(updates)
        trigger = g < max_norm
        return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g.astype(t.dtype)) * max_norm), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: OptimConfig, total_steps: int, modules: tuple[str, ...], mesh=None,
                    staged: bool = False) -> optax.GradientTransformation:
    """With `mesh`, the global norms (clipping, non-finite checks) take one all-reduce per
    sharding pattern of the state (`staged`: the stage layout) instead of one per leaf."""
    global_norm = optax.tree.norm
    if mesh is not None:
        from dip_jax.runtime.norms import sharded_global_norm
        global_norm = sharded_global_norm(mesh, modules, staged)
    sched = lr_schedule(cfg, total_steps)
    mult = dict(cfg.lr_multipliers)

    def adam(m: float):
        lr = (lambda s: sched(s) * m) if callable(sched) else sched * m
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)

    per_module = {m: (optax.set_to_zero() if m in cfg.frozen else adam(mult.get(m, 1.0))) for m in modules}
    zero_frozen = optax.multi_transform(
        {m: optax.set_to_zero() if m in cfg.frozen else optax.identity() for m in modules}, module_labels)
    parts = [zero_frozen]
    if cfg.grad_clip > 0:
        parts.append(clip_by_global_norm(cfg.grad_clip, global_norm) if mesh is not None
                     else optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.multi_transform(per_module, module_labels))
    return skip_nonfinite(optax.chain(*parts), global_norm)      # a NaN step never reaches the state
