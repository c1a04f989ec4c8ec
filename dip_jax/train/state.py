"""Train state: a plain pytree {params, opt_state, step, rng} (orbax saves it as is)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax.config import TrainConfig
from dip_jax.models.lmm import build_model
from dip_jax.train.optim import build_optimizer


def init_state(cfg: TrainConfig):
    """Returns (graphdef, state, tx). The model's params are an nnx.State pytree."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    graphdef, params = nnx.split(model)
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
    }
    return graphdef, state, tx


def abstract_state(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))

