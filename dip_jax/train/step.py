"""The reference train step: unpipelined, data-parallel over every device of the mesh.

It is also the ground truth that pipelined execution is compared with.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx

from dip_jax.runtime.sharding import SCALAR, named
from dip_jax.runtime.update import guarded_update


def loss_fn(graphdef, params, batch):
    return nnx.merge(graphdef, params)(batch)


def make_train_step(graphdef, tx, remat: bool = False, shardings=None):
    """`remat`: the backward recomputes the forward (as the pipelined executor's chunks do), so
    that benchmarks can compare like with like. `shardings`: the state's; the updated state
    keeps them (optimizer moments split over 'data' stay split, so the step never recompiles)."""
    objective = functools.partial(loss_fn, graphdef)
    if remat:
        objective = jax.checkpoint(objective)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], batch)
        updates, opt_state, skipped = guarded_update(tx, grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1, "rng": state["rng"]}
        if shardings is not None:
            new = jax.lax.with_sharding_constraint(new, shardings)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "update_skipped": skipped, **aux}

    return train_step


def make_eval_loss(graphdef):
    @jax.jit
    def eval_loss(params, batch):
        return loss_fn(graphdef, params, batch)[0]
    return eval_loss


def make_logits_fn(graphdef):
    @jax.jit
    def logits(params, batch):
        return nnx.merge(graphdef, params).greedy_logits(batch)
    return logits


def put_batch(arrays: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Microbatch-major arrays are split over every device; scalars are replicated."""
    split, scalar = named(mesh, "batch"), named(mesh, *SCALAR)
    return {k: jax.device_put(v, split if np.ndim(v) else scalar) for k, v in arrays.items()}
