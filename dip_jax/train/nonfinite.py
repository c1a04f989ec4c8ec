"""Non-finite losses and gradients: the update of such a step is never applied, and the run
stops after `train.max_nonfinite_steps` of them in a row (`train.on_nonfinite="stop"`).

The check inside the optimizer costs two norms per step and keeps the state finite whatever
the host decides, so a checkpoint can never hold NaNs; the host check reads the loss and the
gradient norm the step returns anyway.
"""
from __future__ import annotations

import math

from dip_jax.config import TrainSection
from dip_jax.train.errors import RunStopped


def skip_nonfinite(inner, global_norm=None):
    """optax transformation: `inner`'s update, or a zero update and the unchanged optimizer
    state when the gradients or the update are not finite. Same state structure as `inner`, so
    checkpoints do not depend on it. `global_norm`: how to take a tree's norm (optax's by default)."""
    import jax
    import jax.numpy as jnp
    import optax
    norm = global_norm or optax.tree.norm

    def update(grads, state, params=None):
        updates, new_state = inner.update(grads, state, params)
        ok = jnp.isfinite(norm(grads)) & jnp.isfinite(norm(updates))
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def _show(v: float) -> str:
    return f"{v:.4g}"


class NonfiniteMonitor:
    """Per step, on the host: is it finite, and must the run stop?"""

    def __init__(self, cfg: TrainSection):
        self.cfg = cfg
        self.streak: list[int] = []          # consecutive non-finite steps, newest last
        self.total = 0

    def observe(self, step: int, metrics: dict) -> bool:
        """Records the step's loss and gradient norm (floats); returns whether both are finite.
        Prints one line per non-finite step."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        if math.isfinite(loss) and math.isfinite(norm):
            self.streak.clear()
            return True
        self.streak.append(step)
        self.total += 1
        print(f"dip_jax: step {step}: non-finite loss {_show(loss)} / grad_norm {_show(norm)}, update skipped",
              flush=True)
        return False

    def check_stop(self, last_checkpoint: int | None) -> None:
        if self.cfg.on_nonfinite != "stop" or len(self.streak) < self.cfg.max_nonfinite_steps:
            return
        first, last = self.streak[0], self.streak[-1]
        kept = (f"the newest checkpoint (step {last_checkpoint}) holds the last finite state"
                if last_checkpoint else "no checkpoint was written")
        raise RunStopped(f"stopped: loss or gradient norm not finite at steps {first}-{last} "
                         f"({len(self.streak)} in a row, train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); "
                         f"{kept}; lower optim.lr or raise optim.warmup_steps", exit_code=1)
