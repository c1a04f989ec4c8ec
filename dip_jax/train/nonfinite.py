"""Non-finite losses and gradients: the update of such a step is never applied, and the run
stops after `train.max_nonfinite_steps` of them in a row (`train.on_nonfinite="stop"`).

The check inside the optimizer costs two norms per step and keeps the state finite whatever
the host decides, so a checkpoint can never hold NaNs; the host check reads the loss, the
gradient norm and whether the optimizer skipped the update (`update_skipped`: an update that
overflows while the loss and gradients stay finite, as a huge learning rate makes it), which
the step returns anyway.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from dip_jax.config import TrainSection
from dip_jax.train.errors import RunStopped


class Guarded(NamedTuple):
    """An optax transformation that never applies a non-finite update. `checked_update` is
    `update` that also returns whether the update was skipped (a scalar bool on the device), so
    the step can tell the host: the loss and the gradient norm stay finite when only the update
    overflows (a huge learning rate), and a skip must not pass unnoticed."""
    init: Callable
    update: Callable
    checked_update: Callable


def skip_nonfinite(inner, global_norm=None) -> Guarded:
    """optax transformation: `inner`'s update, or a zero update and the unchanged optimizer
    state when the gradients or the update are not finite. Same state structure as `inner`, so
    checkpoints do not depend on it. `global_norm`: how to take a tree's norm (optax's by default)."""
    import jax
    import jax.numpy as jnp
    import optax
    norm = global_norm or optax.tree.norm

    def checked_update(grads, state, params=None):
        updates, new_state = inner.update(grads, state, params)
        ok = jnp.isfinite(norm(grads)) & jnp.isfinite(norm(updates))
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        return updates, new_state, ~ok

    def update(grads, state, params=None):
        return checked_update(grads, state, params)[:2]

    return Guarded(inner.init, update, checked_update)


def _show(v: float) -> str:
    return f"{v:.4g}"


class NonfiniteMonitor:
    """Per step, on the host: is it finite, and must the run stop?"""

    def __init__(self, cfg: TrainSection):
        self.cfg = cfg
        self.streak: list[int] = []          # consecutive non-finite steps, newest last
        self.total = 0
        self.streak_kinds: set[str] = set()  # "values" (loss or gradient norm) and/or "update"
        self.zero_streak, self.warned_zero = 0, False

    def observe(self, step: int, metrics: dict) -> bool:
        """Records the step's loss, gradient norm and `update_skipped` (floats); returns whether
        the step updated the state. Prints one line per step that did not."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        skipped = bool(metrics.get("update_skipped", 0.0))
        self._watch_zero(step, norm)
        if math.isfinite(loss) and math.isfinite(norm) and not skipped:
            self.streak.clear()
            self.streak_kinds.clear()
            return True
        self.streak.append(step)
        self.total += 1
        values_finite = math.isfinite(loss) and math.isfinite(norm)
        self.streak_kinds.add("update" if values_finite else "values")
        what = (f"non-finite update (loss {_show(loss)}, grad_norm {_show(norm)})" if values_finite
                else f"non-finite loss {_show(loss)} / grad_norm {_show(norm)}")
        print(f"dip_jax: step {step}: {what}, update skipped", flush=True)
        return False

    def _watch_zero(self, step: int, norm: float) -> None:
        """A model collapsed to zero gradients trains no further, silently: say so, once."""
        self.zero_streak = self.zero_streak + 1 if norm == 0.0 else 0
        if self.zero_streak == self.cfg.max_nonfinite_steps and not self.warned_zero:
            self.warned_zero = True
            print(f"dip_jax: warning: the gradient norm is exactly 0 for {self.zero_streak} steps in a row (to "
                  f"step {step}): nothing trains; lower optim.lr", flush=True)

    def check_stop(self, last_checkpoint: int | None) -> None:
        if self.cfg.on_nonfinite != "stop" or len(self.streak) < self.cfg.max_nonfinite_steps:
            return
        first, last = self.streak[0], self.streak[-1]
        kept = (f"the newest checkpoint (step {last_checkpoint}) holds the last finite state"
                if last_checkpoint else "no checkpoint was written")
        what = {frozenset({"values"}): "loss or gradient norm", frozenset({"update"}): "update"
                }.get(frozenset(self.streak_kinds), "loss, gradient norm or update")
        raise RunStopped(f"stopped: {what} not finite at steps {first}-{last} "
                         f"({len(self.streak)} in a row, train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); "
                         f"{kept}; lower optim.lr or raise optim.warmup_steps", exit_code=1, everywhere=True)
