"""The large multimodal model: a module graph encoders -> backbone -> optional generator.

Which modules it has, and how each reads the batch and computes its loss, come from the module
specs (dip_jax.specs): the same adapters the pipelined tick engine calls. Encoder outputs
(already projected to the backbone width) replace placeholder tokens in the text sequence; the
generator conditions on the backbone's hidden states at its items' positions. Loss normalisers
(`n_tokens`, `n_clips`) come with the batch, computed on the host over the global batch, so a
pipelined execution that adds microbatch by microbatch gets exactly the same loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dip_jax import specs
from dip_jax.config import MODULES, ModelConfig
from dip_jax.models import attention
from dip_jax.models.losses import flow_loss_sum, flow_targets, lm_loss_sum  # noqa: F401  (re-exported)


def gather_condition(hidden, cond_idx):
    """hidden [M, S, D], cond_idx [M, NV, Lc] -> [M, NV, Lc, D]."""
    return jax.vmap(lambda h, i: h[i])(hidden, cond_idx)


def _flat(x, lead: int = 2):
    return x.reshape(-1, *x.shape[lead:])


class LMM(nnx.Module):
    """One attribute per module, named as in the config (absent built-in ones are None)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dtype = cfg.llm.dim, jnp.dtype(cfg.compute_dtype)
        attention.check(cfg.attention, dtype)     # a backend this machine lacks fails here, not in a compile
        for name in cfg.modules:
            setattr(self, name, specs.get(name).runtime_half().build(cfg, cfg.module(name), d, rngs, dtype))
        for name in MODULES:
            if name not in cfg.modules:
                setattr(self, name, None)
        self._backbone = specs.with_role(cfg, specs.BACKBONE)
        self._generator = specs.with_role(cfg, specs.GENERATOR)

    def merges(self, batch):
        """Encoder outputs and their placeholder positions, per microbatch."""
        out = []
        for name in self.cfg.modules:
            e = specs.get(name).encoder_items
            if e is None or batch[e.input_key].shape[1] == 0:
                continue
            m, n = batch[e.input_key].shape[:2]
            y = getattr(self, name)(_flat(batch[e.input_key]))          # [M*N, t, D]
            out.append((y.reshape(m, n * y.shape[1], -1), batch[e.positions_key].reshape(m, -1)))
        return tuple(out)

    def _backbone_out(self, batch):
        rt = specs.get(self._backbone).runtime_half()
        b = {k: batch[k] for k in rt.batch_keys}
        return rt, b, getattr(self, self._backbone)(rt.inputs(b, self.merges(batch)))

    def __call__(self, batch):
        """Returns (loss, {each module's loss by its runtime spec's loss_name})."""
        rt, b, out = self._backbone_out(batch)
        hidden, loss = rt.loss(out, b, batch)
        aux = {rt.loss_name: loss}
        if self._generator is not None:
            g = specs.get(self._generator).runtime_half()
            if batch[g.batch_keys[0]].shape[1] > 0:
                c = {k: _flat(batch[k]) for k in g.batch_keys}
                inputs, target = g.inputs(c, _flat(gather_condition(hidden, batch[g.cond_key])))
                gl = g.loss(getattr(self, self._generator)(inputs), target, c, batch)
                aux[g.loss_name] = gl
                loss = loss + g.loss_weight(self.cfg) * gl
        return loss, aux

    def greedy_logits(self, batch):
        """Logits of every position (for teacher-forced or greedy evaluation)."""
        return self._backbone_out(batch)[2][1]


def build_model(cfg: ModelConfig, seed: int = 0) -> LMM:
    return LMM(cfg, nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> LMM:
    """Shapes only: nothing is allocated (works for the paper-size configs)."""
    return nnx.eval_shape(lambda: LMM(cfg, nnx.Rngs(0)))


def module_param_counts(model: LMM) -> dict[str, int]:
    state = nnx.state(model, nnx.Param)
    return {name: sum(int(x.size) for x in jax.tree.leaves(state[name])) for name in model.cfg.modules}
