"""Pipelined value_and_grad of an LMM: model params and a batch in, model-shaped grads out.

Ties together the partition (chunks), the tables of per-replica plans, the stage stacks and
the compiled step cache, so that callers (the trainer, tests) see ordinary per-module
parameters and gradients.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dip_jax.models.lmm import LMM
from dip_jax.plan import tables as T
from dip_jax.plan.partition import ModalityPartition
from dip_jax.plan.schedule import Plan
from dip_jax.runtime.cache import StepCache
from dip_jax.runtime.executor import ENCODER_INPUT, build_step
from dip_jax.runtime.stages import StageLayout, stack, unstack

is_blocks = lambda path, _: len(path) > 0 and path[0] == "blocks"
CLIP_KEYS = ("latents", "noise", "t", "cond_idx", "cond_mask", "video_valid")
LLM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ExecSpec:
    graphdef: dict
    block_def: dict
    carry: dict
    boundary_shape: dict
    bnd_shape: dict
    llm_dim: int
    dit_loss_weight: float


class PipelineExecutor:
    def __init__(self, model: LMM, partition: ModalityPartition, mesh, max_items: dict[str, int],
                 seq_len: int, cache_size: int = 8, persistent_cache_dir: str | None = None):
        self.partition, self.mesh = partition, mesh
        self.P = partition.P
        self.data = mesh.shape["data"]
        self.modules = tuple(m.name for m in partition.modules)
        self.layouts = {m.name: StageLayout(self.P, m.chunks // self.P, m.layers) for m in partition.modules}
        self.unit = {m.name: m.unit for m in partition.modules}
        self.subs = {m: (1 if m == "llm" else max(1, math.ceil(max_items.get(m, 1) / self.unit[m])))
                     for m in self.modules}
        cfg = model.cfg
        graphdef, block_def, carry, bshape, bnd = {}, {}, {}, {}, {}
        for m in self.modules:
            module = getattr(model, m)
            graphdef[m] = nnx.split(module, is_blocks, ...)[0]
            block_def[m] = nnx.graphdef(module.blocks)
            carry[m] = self._carry_shape(model, m, seq_len)
            if m in ENCODER_INPUT:
                t = getattr(cfg, m).tokens_per_image if m == "vision" else getattr(cfg, m).tokens_per_clip
                bshape[m] = (self.unit[m], t, cfg.llm.dim)
                bnd[m] = (self.subs[m], self.unit[m], t, cfg.llm.dim)
        self.spec = ExecSpec(graphdef, block_def, carry, bshape, bnd, cfg.llm.dim, cfg.dit_loss_weight)
        self._buckets: dict = {}
        self.cache = StepCache(lambda sig: build_step(self.spec, sig, mesh), cache_size, persistent_cache_dir)

    def _carry_shape(self, model, m, seq_len):
        module, u, cfg = getattr(model, m), self.unit[m], model.cfg
        if m == "vision":
            v = cfg.vision
            x = jax.ShapeDtypeStruct((u, v.image_size, v.image_size, v.channels), jnp.float32)
        elif m == "audio":
            x = jax.ShapeDtypeStruct((u, cfg.audio.frames_per_clip, cfg.audio.mel_bins), jnp.float32)
        elif m == "llm":
            x = {"tokens": jax.ShapeDtypeStruct((1, seq_len), jnp.int32), "merges": ()}
        else:
            d = cfg.dit
            x = {"x_t": jax.ShapeDtypeStruct((u, d.tokens_per_clip, d.latent_channels), jnp.float32),
                 "t": jax.ShapeDtypeStruct((u,), jnp.float32),
                 "cond": jax.ShapeDtypeStruct((u, d.cond_tokens, cfg.llm.dim), jnp.float32)}
        gd, state = nnx.split(module)
        return jax.eval_shape(lambda s, x: nnx.merge(gd, s).embed(x), state, x)

    # -- parameters ----------------------------------------------------------------------
    def stage_params(self, params: nnx.State):
        """Model params -> (stacks [P, K, Lc, ...], layer masks, edge params), placed."""
        stacks, masks, edges = {}, {}, {}
        pipe = NamedSharding(self.mesh, P("pipe"))
        rep = NamedSharding(self.mesh, P())
        for m in self.modules:
            state = params[m]
            s, mask = stack(state["blocks"], self.layouts[m])
            stacks[m] = jax.device_put(s, pipe)
            masks[m] = jax.device_put(mask, pipe)
            edges[m] = jax.device_put(nnx.State({k: v for k, v in state.items() if k != "blocks"}), rep)
        return stacks, masks, edges

    def model_grads(self, params: nnx.State, g_stacks, g_edges) -> nnx.State:
        """Gradients in the model's layout (zeros for modules without backward)."""
        grads = jax.tree.map(jnp.zeros_like, params)
        for m in self.modules:
            if m not in g_stacks:
                continue
            grads[m]["blocks"] = unstack(g_stacks[m], self.layouts[m])
            for k, v in g_edges[m].items():
                grads[m][k] = v
        return grads

    # -- batch ---------------------------------------------------------------------------
    def replica_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global collated arrays [M, ...] -> [data, M/data, ...], item axes padded to whole
        sub-microbatches."""
        out = {}
        for k in LLM_KEYS:
            out[k] = arrays[k]
        for m, (x_key, pos_key) in ENCODER_INPUT.items():
            if m in self.modules:
                n = self.subs[m] * self.unit[m]
                out[x_key] = _pad_axis1(arrays[x_key], n, 0)
                out[pos_key] = _pad_axis1(arrays[pos_key], n, arrays["tokens"].shape[1]).reshape(
                    arrays[pos_key].shape[0], -1)
        if "dit" in self.modules:
            n = self.subs["dit"] * self.unit["dit"]
            for k in CLIP_KEYS:
                out[k] = _pad_axis1(arrays[k], n, 0)
        D = self.data
        out = {k: v.reshape(D, v.shape[0] // D, *v.shape[1:]) for k, v in out.items()}
        for k in ("n_tokens", "n_clips"):
            out[k] = np.full((D,), arrays.get(k, 1.0), np.float32)
        return out

    # -- tables --------------------------------------------------------------------------
    def tables(self, plans: list[Plan], buckets: dict | None = None):
        """One plan per data replica -> stacked tables of one common signature. Without
        `buckets`, the sizes are the smallest that fit these plans and all earlier ones."""
        if len(plans) != self.data:
            raise ValueError(f"{len(plans)} plans for {self.data} data replicas")
        if buckets is None:
            # buckets only grow during a run: a batch that fits a compiled program reuses it
            kind = tuple(m.backward for m in plans[0].graph.modules)       # training or forward-only
            fit = T.buckets_for(plans)
            buckets = T.widen(fit, self._buckets.get(kind, fit))
            self._buckets[kind] = buckets
        tabs = [T.lower(p, buckets) for p in plans]
        sig = tabs[0].signature
        ops = np.stack([t.ops for t in tabs])
        recv = np.stack([t.recv for t in tabs])
        return ops, recv, max(t.n_ticks for t in tabs), sig

    def value_and_grad(self, params: nnx.State, arrays: dict[str, np.ndarray], plans: list[Plan],
                       buckets: dict | None = None):
        """Loss and model-shaped gradients of the pipelined execution of `plans` (one per replica)."""
        ops, recv, ticks, sig = self.tables(plans, buckets)
        return self.run_tables(params, arrays, ops, recv, ticks, sig)

    def loss(self, params: nnx.State, arrays: dict[str, np.ndarray], plans: list[Plan], buckets: dict | None = None):
        """Loss only (forward-only plans, e.g. evaluation: no gradient buffers are built)."""
        ops, recv, ticks, sig = self.tables(plans, buckets)
        return self._execute(params, arrays, ops, recv, ticks, sig)[0]

    def run_tables(self, params: nnx.State, arrays, ops, recv, n_ticks: int, sig: T.Signature):
        """Execute lowered tables as given (tests corrupt them on purpose)."""
        loss, g_stacks, g_edges = self._execute(params, arrays, ops, recv, n_ticks, sig)
        return loss, self.model_grads(params, g_stacks, g_edges)

    def _execute(self, params, arrays, ops, recv, n_ticks, sig):
        stacks, masks, edges = self.stage_params(params)
        args = (stacks, masks, edges, self._put(self.replica_batch(arrays), P("data")),
                self._put(ops, P("data", None, "pipe")), self._put(recv, P("data", None, "pipe")), jnp.int32(n_ticks))
        return self.cache.get(sig, *args)(*args)

    def _put(self, x, spec):
        return jax.device_put(jax.tree.map(jnp.asarray, x), NamedSharding(self.mesh, spec))


def _pad_axis1(a: np.ndarray, n: int, fill) -> np.ndarray:
    if a.shape[1] >= n:
        return a[:, :n]
    pad = np.full((a.shape[0], n - a.shape[1], *a.shape[2:]), fill, a.dtype)
    return np.concatenate([a, pad], axis=1)
