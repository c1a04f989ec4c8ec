"""The pipelined step of an LMM: tables, stage-layout state and compiled programs together.

Ties together the partition (chunks), the tables of per-replica plans, the stage layout and
the compiled step cache. Training keeps its state in the stage layout (`train_step`: one
program per step, state donated); `value_and_grad` and `loss` take and give model-layout
parameters and gradients, for tests and notebooks.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dip_jax import specs
from dip_jax.models.lmm import LMM
from dip_jax.plan import tables as T
from dip_jax.plan.partition import ModalityPartition
from dip_jax.plan.schedule import Plan
from dip_jax.runtime.cache import StepCache
from dip_jax.runtime.executor import build_step
from dip_jax.runtime.norms import sharded_global_norm
from dip_jax.runtime.sharding import REPLICA, REPLICA_BATCH, SCALAR, TABLE, named, state_shardings
from dip_jax.runtime.stages import StageLayout, like, relayout
from dip_jax.runtime.update import guarded_update

is_blocks = lambda path, _: len(path) > 0 and path[0] == "blocks"


@dataclasses.dataclass(frozen=True)
class ExecSpec:
    """What the tick engine needs of the model, per module name."""
    graphdef: dict
    block_def: dict
    carry: dict
    boundary_shape: dict             # encoders: one sub-microbatch's output [unit, tokens, D]
    bnd_shape: dict                  # encoders: a microbatch's outputs [subs, unit, tokens, D]
    llm_dim: int                     # the backbone width D
    runtime: dict                    # the modules' runtime specs
    encoder_input: dict              # encoders: (input key, positions key) in the batch
    loss_weight: dict                # the generator's loss weight
    dtype: object                    # of the activations carried between chunks (the compute dtype)


class PipelineExecutor:
    def __init__(self, model: LMM, partition: ModalityPartition, mesh, max_items: dict[str, int],
                 seq_len: int, cache_size: int = 8, persistent_cache_dir: str | None = None,
                 tx: optax.GradientTransformation | None = None, packed_channels: bool = True,
                 shard_state_over_data: bool = False, drop_tensor_reductions: bool = False,
                 remat: str = "auto"):
        """`model`: the LMM, concrete or abstract (`nnx.eval_shape`): only its structure is
        read. `tx`: the optimizer `train_step` applies. `packed_channels=False`: one collective
        per channel and tick instead of one per direction (for measurements).
        `shard_state_over_data`: the optimizer moments are split over 'data' too (ZeRO-1).
        `drop_tensor_reductions`: leave out the tensor group's all-reduces (a negative control).
        `remat`: what a recomputing backward keeps (`pipeline.remat`: auto | chunk | layers)."""
        self.remat = remat
        self._unflatten: dict = {}
        self.partition, self.mesh, self.tx = partition, mesh, tx
        self.zero, self.drop_tensor_reductions = shard_state_over_data, drop_tensor_reductions
        self.packed_channels = packed_channels
        self.P = partition.P
        self.data = mesh.shape[REPLICA]
        self.modules = tuple(m.name for m in partition.modules)
        self.layouts = {m.name: StageLayout(self.P, m.chunks // self.P, m.layers) for m in partition.modules}
        self.unit = {m.name: m.unit for m in partition.modules}
        cfg = model.cfg
        self.specs = {m: specs.get(m) for m in self.modules}
        self.runtime = {m: s.runtime_half() for m, s in self.specs.items()}
        self.subs = {m: (1 if s.role == specs.BACKBONE else max(1, math.ceil(max_items.get(m, 1) / self.unit[m])))
                     for m, s in self.specs.items()}
        graphdef, block_def, carry, bshape, bnd, enc_in = {}, {}, {}, {}, {}, {}
        for m in self.modules:
            module = getattr(model, m)
            graphdef[m] = nnx.split(module, is_blocks, ...)[0]
            block_def[m] = nnx.graphdef(module.blocks)
            carry[m] = self._carry_shape(model, m, seq_len)
            e = self.specs[m].encoder_items
            if e is not None:
                t = self.specs[m].tokens_per_item(cfg.module(m))
                bshape[m] = (self.unit[m], t, cfg.width)
                bnd[m] = (self.subs[m], self.unit[m], t, cfg.width)
                enc_in[m] = (e.input_key, e.positions_key)
        self.backbone = specs.with_role(cfg, specs.BACKBONE)
        gen = specs.with_role(cfg, specs.GENERATOR)
        self.generator = gen if gen in self.modules else None
        dtype = jax.tree.leaves(carry[self.backbone])[0].dtype
        weights = {m: self.runtime[m].loss_weight(cfg) for m in self.modules}
        self.spec = ExecSpec(graphdef, block_def, carry, bshape, bnd, cfg.width, self.runtime, enc_in, weights, dtype)
        self._buckets: dict = {}
        self._relayouts: dict = {}
        self.masks = {m: jax.device_put(l.index()[1], named(mesh, "stage")) for m, l in self.layouts.items()}
        self.global_norm = sharded_global_norm(mesh, self.modules, True)
        self.cache = StepCache(self._build, cache_size, persistent_cache_dir)

    def _carry_shape(self, model, m, seq_len):
        module, u = getattr(model, m), self.unit[m]
        gd, state = nnx.split(module)
        embed = lambda s: nnx.merge(gd, s).embed(self.runtime[m].example_input(model.cfg, u, seq_len, jnp.zeros))
        return jax.eval_shape(embed, state)

    # -- parameters ----------------------------------------------------------------------
    def state_shardings(self, tree, staged: bool = True):
        """Shardings of a train-state tree in the stage layout (`staged`) or the model layout."""
        return state_shardings(self.mesh, tree, self.modules, staged, self.zero)

    def to_stage(self, tree):
        """Model-layout params (or any state tree) -> stage layout, placed (on device)."""
        return self._relayout(tree, {m: None for m in self.layouts}, self.layouts, True)

    def to_model(self, tree):
        """Stage-layout tree -> model layout, replicated (on device)."""
        return self._relayout(tree, self.layouts, {m: None for m in self.layouts}, False)

    def _relayout(self, tree, src, dst, staged: bool):
        key = (tuple(src.items()), tuple(dst.items()))
        if key not in self._relayouts:
            def convert(t):
                out = relayout(t, src, dst)
                return jax.lax.with_sharding_constraint(out, self.state_shardings(out, staged))
            self._relayouts[key] = jax.jit(convert)
        return self._relayouts[key](tree)

    # -- batch ---------------------------------------------------------------------------
    def replica_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global collated arrays [M, ...] -> [data, M/data, ...], item axes padded to whole
        sub-microbatches."""
        out = {}
        seq = self.runtime[self.backbone].batch_keys
        for k in seq:
            out[k] = arrays[k]
        S = arrays[seq[0]].shape[1]
        for m, (x_key, pos_key) in self.spec.encoder_input.items():
            n = self.subs[m] * self.unit[m]
            out[x_key] = _pad_axis1(arrays[x_key], n, 0)
            out[pos_key] = _pad_axis1(arrays[pos_key], n, S).reshape(arrays[pos_key].shape[0], -1)
        if self.generator is not None:
            n = self.subs[self.generator] * self.unit[self.generator]
            for k in self.runtime[self.generator].batch_keys:
                out[k] = _pad_axis1(arrays[k], n, 0)
        D = self.data
        out = {k: v.reshape(D, v.shape[0] // D, *v.shape[1:]) for k, v in out.items()}
        for k in sorted({k for r in self.runtime.values() for k in r.scalars}):
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
        elif "res" not in buckets:          # sizes given before plans stored residuals: fit the residuals
            buckets = {**buckets, "res": T.buckets_for(plans)["res"]}
        tabs = [T.lower(p, buckets) for p in plans]
        sig = tabs[0].signature
        if any(t.signature != sig for t in tabs):
            raise ValueError("the replicas' tables have different signatures: give buckets for every size")
        ops = np.stack([t.ops for t in tabs])
        recv = np.stack([t.recv for t in tabs])
        return ops, recv, max(t.n_ticks for t in tabs), sig

    def residual_bytes(self, state: dict, arrays: dict[str, np.ndarray], plans: list[Plan]) -> dict[str, int]:
        """Per module with backward ops: the bytes one stored op keeps per device (its chunk's
        residuals less the parameters), read off the traced step (nothing is compiled or run).
        `state`: the train state (or its shapes); `plans`: any plans of one batch (for shapes)."""
        fit = T.buckets_for(plans)          # not self.tables: a probe must not widen the run's buckets
        tabs = [T.lower(p, fit) for p in plans]
        ops, recv = np.stack([t.ops for t in tabs]), np.stack([t.recv for t in tabs])
        ticks = max(t.n_ticks for t in tabs)
        sig = dataclasses.replace(tabs[0].signature, res_slots=tuple(int(b) for b in tabs[0].signature.backward))
        core = build_step(self.spec, sig, self.mesh, self.packed_channels, self.drop_tensor_reductions, self.remat)
        shapes = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
        inputs = (self.replica_batch(arrays), ops, recv, np.int32(ticks))
        jax.eval_shape(core, shapes(state["params"]), self.masks, *inputs)
        return dict(core.residual_bytes)

    def residual_profile(self, state: dict, arrays: dict[str, np.ndarray], plans: list[Plan]) -> dict:
        """`residual_bytes` as the cost model reads it (`Calibration.residuals`): per module, bytes
        per layer at its unit (the executor's chunks are all as deep as the deepest)."""
        got = self.residual_bytes(state, arrays, plans)
        return {m.name: {"units": [m.unit], "a": [0.0], "b": [got[m.name] / max(m.layers)]}
                for m in self.partition.modules if m.name in got}

    def value_and_grad(self, params: nnx.State, arrays: dict[str, np.ndarray], plans: list[Plan],
                       buckets: dict | None = None):
        """Loss and model-shaped gradients of the pipelined execution of `plans` (one per
        replica), for model-layout `params` (tests and notebooks; training keeps its state in
        the stage layout and calls `train_step`)."""
        ops, recv, ticks, sig = self.tables(plans, buckets)
        return self.run_tables(params, arrays, ops, recv, ticks, sig)

    def loss(self, params: nnx.State, arrays: dict[str, np.ndarray], plans: list[Plan], buckets: dict | None = None):
        """Loss only (forward-only plans, e.g. evaluation: no gradient buffers are built), for
        model-layout `params`."""
        return self.stage_loss(self.to_stage(params), arrays, plans, buckets)

    def stage_loss(self, params: nnx.State, arrays: dict[str, np.ndarray], plans: list[Plan],
                   buckets: dict | None = None):
        """Loss only, for stage-layout `params`."""
        ops, recv, ticks, sig = self.tables(plans, buckets)
        args = (params, self.masks, *self.device_inputs(arrays, ops, recv, ticks))
        return self.cache.get(("grads", sig), *args)(*args)[0]

    def run_tables(self, params: nnx.State, arrays, ops, recv, n_ticks: int, sig: T.Signature):
        """Execute lowered tables as given (tests corrupt them on purpose); model layout in and out."""
        staged = self.to_stage(params)
        args = (staged, self.masks, *self.device_inputs(arrays, ops, recv, n_ticks))
        loss, flat = self.cache.get(("grads", sig), *args)(*args)
        if sig not in self._unflatten:      # a reshaping, not a step program: kept out of the step cache
            self._unflatten[sig] = jax.jit(build_step(self.spec, sig, self.mesh).unflatten)
        grads = self._unflatten[sig](staged, flat)
        return loss, self.to_model(with_frozen(staged, grads))

    # -- training -------------------------------------------------------------------------
    def train_step(self, state: dict, arrays: dict[str, np.ndarray], plans: list[Plan], buckets: dict | None = None):
        """One training step on a stage-layout state: the tick loop, the gradient reduction,
        the gradient norm and the optimizer update run as one compiled program with the state
        donated. Returns (state, {"loss", "grad_norm"}) with the metrics still on device."""
        return self.run_train(state, *self.prepare(arrays, plans, buckets))

    def prepare(self, arrays: dict[str, np.ndarray], plans: list[Plan], buckets: dict | None = None):
        """(the step's device inputs, transferred, and their signature) for `run_train`."""
        ops, recv, ticks, sig = self.tables(plans, buckets)
        return self.device_inputs(arrays, ops, recv, ticks), sig

    def run_train(self, state: dict, inputs: tuple, sig: T.Signature):
        """The compiled step on inputs already on device: nothing else crosses to the devices."""
        args = (state, self.masks, *inputs)
        return self.cache.get(("train", sig), *args)(*args)

    def device_inputs(self, arrays, ops, recv, n_ticks: int):
        """The per-step inputs, transferred explicitly: batch, tables, tick count."""
        return (self._put(self.replica_batch(arrays), REPLICA_BATCH), self._put(ops, TABLE),
                self._put(recv, TABLE), self._put(np.int32(n_ticks), SCALAR))

    def _build(self, key):
        kind, sig = key
        core = build_step(self.spec, sig, self.mesh, self.packed_channels, self.drop_tensor_reductions, self.remat)
        self.remat_chosen = core.remat        # filled in when the program is traced
        if kind == "grads":
            return jax.jit(core)
        if self.tx is None:
            raise ValueError("train_step needs the optimizer: PipelineExecutor(..., tx=...)")
        tx = self.tx

        def train(state, masks, batch, ops, recv, n_ticks):
            params = state["params"]
            loss, flat = core(params, masks, batch, ops, recv, n_ticks)
            grads = with_frozen(params, core.unflatten(params, flat))
            updates, opt_state, skipped = guarded_update(tx, grads, state["opt_state"], params)
            new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                   "step": state["step"] + 1, "rng": state["rng"]}
            # the state keeps its shardings (moments split over 'data' stay split), so a donated
            # state is always a valid input of the next step's program
            new = jax.lax.with_sharding_constraint(new, self.state_shardings(new))
            return new, {"loss": loss, "grad_norm": self.global_norm(grads), "update_skipped": skipped}
        return jax.jit(train, donate_argnums=0)

    def _put(self, x, names):
        """Every process holds the whole host array: each places its own shards (device_put of
        a host array onto devices of several processes costs a cross-process exchange per array)."""
        sharding = named(self.mesh, *names)

        def place(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
        return jax.tree.map(place, x)


def with_frozen(params, grads):
    """Gradients for every module of `params`: modules without backward ops (frozen) get zeros."""
    return like(params, {m: grads[m] if m in grads else jax.tree.map(jnp.zeros_like, params[m]) for m in params})


def _pad_axis1(a: np.ndarray, n: int, fill) -> np.ndarray:
    if a.shape[1] >= n:
        return a[:, :n]
    pad = np.full((a.shape[0], n - a.shape[1], *a.shape[2:]), fill, a.dtype)
    return np.concatenate([a, pad], axis=1)
