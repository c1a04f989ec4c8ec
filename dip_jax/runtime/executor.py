"""The generic table-driven pipeline step: one compiled shard_map program runs any plan.

Per rank: a fori_loop over the traced `n_ticks`; each tick one `lax.switch` for the forward op
and one for the backward op, whose branches are (module, last chunk or not, strategy) with the
no-op branch first, then one packed ppermute to rank+1 (activations, encoder outputs, llm
states) and one to rank-1 (cotangents), wrapping around, written into table-addressed slots (a
trash slot when nothing is due). So a tick runs three host-synchronising control-flow ops on an
accelerator (the loop's condition and the two switches), whatever the module set.

No buffer the loop carries passes through a switch: XLA (before jaxlib 0.11.1) copies every
operand that a multi-branch conditional returns, in place or not. The branches read rows and
return per-op values; every write into a carried buffer happens outside them, at an address
from the table (a trash slot or window when nothing is due). The gradients of a rank live in one
flat buffer: a backward returns its chunk's gradient and its module's edge gradient as two
zero-padded windows, added in place at the offsets of the op's module and chunk.

The memory strategy is per op, in the table: a backward recomputes its chunk under jax.vjp from
the stashed input, or, when its forward stored the chunk's residuals (the leaves of the blocks'
vjp function under jax.checkpoint's `dots_saveable`: the matmuls' outputs, less the parameters it
reads again, and the blocks' output), applies them and recomputes only the elementwise rest and
the head. Indexing is dynamic_index / dynamic_update_index only. Data-parallel replicas run their
own tables; gradients are reduced once, after the loop. The runtime holds no scheduling logic.

Boundaries, by the modules' roles: an encoder's last chunk (rank P-1) sends its projected
output to rank 0, where the backbone's first chunk merges all of a microbatch's encoder outputs
into the token sequence; the backbone's first-chunk backward sends one padded cotangent payload
back, from which each encoder sub-microbatch's backward reads its slice. The backbone's last
chunk sends its final states to rank 0 for the generator, whose first-chunk backwards
accumulate the cotangent of those states; the last one sends it to the backbone's last-chunk
backward. How a first chunk reads the batch and what a last chunk's loss is come from the
modules' runtime specs (`spec.runtime[m]`); nothing here names a module.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from dip_jax.plan import tables as T
from dip_jax.runtime import sharding as S
from dip_jax.runtime.channels import packed_ppermute, packed_psum
from dip_jax.runtime.sharding import REPLICA, STAGE, TENSOR
from dip_jax.runtime.stages import like
from dip_jax.runtime.tensor import split_block

row = lambda a, i: lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
put = lambda a, i, x: lax.dynamic_update_index_in_dim(a, x, i, 0)
take = lambda tree, i: jax.tree.map(lambda a: row(a, i), tree)


def take2(tree, i, j):
    """Rows i and j of every buffer in `tree`, each buffer read once (one gather): a buffer read
    by two slices and then updated in place is copied, whole, every tick."""
    both = jax.tree.map(lambda a: jnp.take(a, jnp.stack([i, j]), axis=0, mode="clip"), tree)
    return jax.tree.map(lambda a: a[0], both), jax.tree.map(lambda a: a[1], both)
zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)


def _sub(a, sub, unit):
    """Rows sub*unit .. sub*unit+unit-1 of a [items, ...] array."""
    return lax.dynamic_slice_in_dim(a, sub * unit, unit, axis=0)


def _where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def split_residuals(pull, params):
    """A vjp function -> (the leaves to keep, layout). Leaves that are parameters are not kept:
    the backward reads the parameters again (they do not change within a step)."""
    leaves, tdef = jax.tree.flatten(pull)
    p = jax.tree.leaves(params)
    where = tuple(next((k for k, q in enumerate(p) if leaf is q), None) for leaf in leaves)
    return [leaf for leaf, w in zip(leaves, where) if w is None], (tdef, where)


def join_residuals(kept, layout, params):
    """The inverse of `split_residuals`: the vjp function, from kept leaves and the parameters."""
    tdef, where = layout
    p, rest = jax.tree.leaves(params), iter(kept)
    return jax.tree.unflatten(tdef, [next(rest) if w is None else p[w] for w in where])


class Packed:
    """Arrays of fixed shapes as one flat vector per dtype (what a residual slot holds): one
    buffer per dtype and module instead of one per residual leaf."""

    def __init__(self, shapes):
        self.shapes = [(tuple(a.shape), jnp.dtype(a.dtype)) for a in shapes]
        self.width: dict = {}
        self.at = []
        for shape, dtype in self.shapes:
            self.at.append(self.width.get(dtype.name, 0))
            self.width[dtype.name] = self.width.get(dtype.name, 0) + math.prod(shape)

    def zeros(self, lead=()):
        return {d: jnp.zeros((*lead, n), d) for d, n in self.width.items()}

    def pack(self, arrays):
        parts: dict = {d: [] for d in self.width}
        for a, (_, dtype) in zip(arrays, self.shapes):
            parts[dtype.name].append(a.reshape(-1).astype(dtype))
        return {d: jnp.concatenate(v) for d, v in parts.items()}

    def unpack(self, flat):
        return [flat[dtype.name][at:at + math.prod(shape)].reshape(shape)
                for (shape, dtype), at in zip(self.shapes, self.at)]


class FlatGrads:
    """A rank's gradients (and its loss) in one flat buffer: per module its stacks, chunk-major
    ([K, c_m]), then per module its edges, then the loss. A backward's gradient is added as one
    window as wide as the widest chunk and one as wide as the widest edge set, zero-padded: the
    padding adds zeros to whatever follows, and an op-less tick adds a window of zeros at 0."""

    def __init__(self, stacks: dict, edges: dict):
        self.stacks, self.edges = stacks, edges
        leaves = jax.tree.leaves((stacks, edges))
        self.dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        size = lambda tree, lead=0: sum(math.prod(a.shape[lead:]) for a in jax.tree.leaves(tree))
        self.chunk = {m: size(s, 1) for m, s in stacks.items()}
        self.n_chunks = {m: jax.tree.leaves(s)[0].shape[0] if jax.tree.leaves(s) else 0 for m, s in stacks.items()}
        self.edge = {m: size(e) for m, e in edges.items()}
        self.w_stack = max(self.chunk.values(), default=0)
        self.w_edge = max(self.edge.values(), default=0)
        self.stack_at, self.edge_at, at = {}, {}, 0
        for m in sorted(stacks, key=self.chunk.get):        # the widest last: its window ends at its end
            self.stack_at[m], at = at, at + self.n_chunks[m] * self.chunk[m]
        self.edges_from = at
        for m in sorted(edges, key=self.edge.get):
            self.edge_at[m], at = at, at + self.edge[m]
        self.loss_at = at
        self.size = max([at + 1] + [self.stack_at[m] + (self.n_chunks[m] - 1) * self.chunk[m] + self.w_stack
                                    for m in stacks] + [self.edge_at[m] + self.w_edge for m in edges])

    def zeros(self):
        return jnp.zeros((self.size,), self.dtype)

    def flat(self, tree, width):
        """One chunk's (or edge set's) gradient as a window of `width`."""
        parts = [a.reshape(-1).astype(self.dtype) for a in jax.tree.leaves(tree)]
        v = jnp.concatenate(parts) if parts else jnp.zeros((0,), self.dtype)
        return jnp.pad(v, (0, width - v.shape[0]))

    @staticmethod
    def add(G, at, window):
        if window.shape[0] == 0:
            return G
        return lax.dynamic_update_slice(G, lax.dynamic_slice(G, (at,), window.shape) + window, (at,))

    def parts(self, G):
        """(the stacks' part, the edges' and loss's part): reduced over different axes."""
        return G[:self.edges_from], G[self.edges_from:self.loss_at + 1]

    def unflatten(self, stack_part, edge_part):
        """-> (stack gradients, edge gradients, loss) in the trees' shapes."""
        def split(flat, tree, at, lead):
            leaves, tdef = jax.tree.flatten(tree)
            width = sum(math.prod(a.shape[1 if lead else 0:]) for a in leaves)
            block = lax.slice_in_dim(flat, at, at + width * (lead or 1))
            block = block.reshape(lead, width) if lead else block
            out, o = [], 0
            for a in leaves:
                n = math.prod(a.shape[1 if lead else 0:])
                piece = block[:, o:o + n] if lead else block[o:o + n]
                out.append(piece.reshape(a.shape).astype(a.dtype))
                o += n
            return jax.tree.unflatten(tdef, out)
        e0 = self.edges_from
        return ({m: split(stack_part, s, self.stack_at[m], self.n_chunks[m]) for m, s in self.stacks.items()},
                {m: split(edge_part, e, self.edge_at[m] - e0, 0) for m, e in self.edges.items()},
                edge_part[self.loss_at - e0].astype(jnp.float32))


REMAT_AUTO_BYTES = 1 << 30      # pipeline.remat=auto: per layer above this many residual bytes per chunk


def build_step(spec, sig: T.Signature, mesh, packed: bool = True, drop_tensor_reductions: bool = False,
               remat: str = "auto"):
    """spec: runtime.pipeline.ExecSpec (module graphdefs, runtime specs, shapes). Returns the (unjitted) step

    step(params, masks, batch, ops, recv, n_ticks) -> (loss, flat gradients)
    step.unflatten(params, flat gradients) -> grads

    `params`: per module, the stage-layout parameters (block stacks [P, K, Lc, ...] split over
    the stages, other parameters replicated); `grads` has their layout, for the modules with
    backward ops, reduced over the data replicas (the flat gradients: one buffer per device,
    so that a program returning them holds no second copy). `packed=False` sends one collective per
    channel and gradient leaf (what a tick and a step cost before packing; kept to measure it and
    for the HLO lint's negative control). The program is manual over every mesh axis; with a
    'tensor' axis each device runs its chunks on its own share of the blocks' heads and hidden
    units, and runtime/tensor.py adds the group's all-reduces (`drop_tensor_reductions` leaves
    them out: the tensor tests' negative control). `remat` (chunk | layers | auto): whether a
    recomputing backward keeps its chunk's residuals or each layer's input only (and runs each
    layer's forward once more); auto picks per module by the residuals' size
    (`step.remat` says what was picked, once traced).
    """
    Pn = sig.P
    mods = sig.modules
    kid = {m: i for i, m in enumerate(mods)}
    cols = sig.recv_columns()
    bwd = dict(zip(mods, sig.backward))
    unit = dict(zip(mods, sig.units))
    n_chunks = {m: Pn * k for m, k in zip(mods, sig.chunks_per_rank)}
    slots = {m: (s, c) for m, s, c in zip(mods, sig.stash_slots, sig.cot_slots)}
    nres = {m: sig.residual_slots(m) for m in mods}
    nb, nc = sig.boundary_slots, sig.cond_slots
    encoders, bb, gen = sig.encoders, sig.backbone, sig.generator
    rt = spec.runtime
    send = ((lambda tree, perm: packed_ppermute(tree, STAGE, perm)) if packed else
            (lambda tree, perm: jax.tree.map(lambda x: lax.ppermute(x, STAGE, perm), tree)))
    reduce = packed_psum if packed else (lambda tree, axes: jax.tree.map(lambda x: lax.psum(x, axes), tree))
    fwd_perm = [(i, (i + 1) % Pn) for i in range(Pn)]
    bwd_perm = [(i, (i - 1) % Pn) for i in range(Pn)]
    D = spec.llm_dim
    tensor_split = mesh.shape.get(TENSOR, 1) > 1
    # the switches' branches: 0 is the no-op (its operands pass through without a copy)
    fwd_branches = [(m, last, store) for m in mods for store in ((False, True) if nres[m] else (False,))
                    for last in (False, True)]
    bwd_branches = [(m, last, stored) for m in mods if bwd[m]
                    for stored in ((False, True) if nres[m] else (False,)) for last in (False, True)]

    def branch_table(branches):
        """[module, last, strategy] -> switch index (a strategy a module lacks never occurs)."""
        tab = [[[0, 0], [0, 0]] for _ in mods]
        for i, (m, last, s) in enumerate(branches):
            tab[kid[m]][int(last)][int(s)] = i + 1
            if not nres[m]:
                tab[kid[m]][int(last)][1] = i + 1
        return jnp.asarray(tab, jnp.int32)

    def module_of(m, layer_p, edge):
        return nnx.merge(spec.graphdef[m], nnx.State({"blocks": layer_p}), edge)

    def blocks(m, layer_p, layer_mask, module, carry, ctx, policy=None):
        block_def = spec.block_def[m]
        merge = (lambda p: split_block(nnx.merge(block_def, p), TENSOR, drop_tensor_reductions)) if tensor_split \
            else (lambda p: nnx.merge(block_def, p))
        layer = lambda p, c: module.step(merge(p), c, ctx)
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy)

        def body(c, lp):
            p, keep = lp
            return _where(keep, layer(p, c), c), None
        return lax.scan(body, carry, (layer_p, layer_mask))[0]

    def inputs_of(m, ext, batch, mb, sub):
        """(what the module's embed reads, what its blocks' context is built from)."""
        if m in encoders:
            return _sub(row(batch[spec.encoder_input[m][0]], mb), sub, unit[m]), None
        b = head_needs(m, ext, batch, mb, sub, inputs=True)
        return b, b

    def head_needs(m, ext, batch, mb, sub, inputs=False):
        """The batch rows a backbone's or generator's head (or, `inputs`, its embed) reads."""
        r = rt[m]
        if m == bb:
            b = {k: row(batch[k], mb)[None] for k in r.batch_keys}
            if not inputs:
                return b
            merges = tuple((ext[e].reshape(1, -1, D), row(batch[spec.encoder_input[e][1]], mb)[None])
                           for e in encoders)
            return r.inputs(b, merges)
        b = {k: _sub(row(batch[k], mb), sub, unit[m]) for k in r.batch_keys}
        model_in, target = r.inputs(b, ext)
        return model_in if inputs else (b, target)

    def body(m, lp, mask, edge, x_stash, ext, first, batch, mb, sub, policy=None):
        """A chunk's blocks: (embed if first) -> masked layers."""
        module = module_of(m, lp, edge)
        emb, ctx = inputs_of(m, ext, batch, mb, sub)
        x = _where(first, module.embed(emb), x_stash)
        return blocks(m, lp, mask, module, x, None if ctx is None else module.context(ctx), policy)

    def head(m, lp, edge, y, ext, batch, mb, sub):
        """A last chunk's head: (boundary out, loss)."""
        module = module_of(m, lp, edge)
        if m in encoders:
            return module.head(y), jnp.zeros((), jnp.float32)
        need = head_needs(m, ext, batch, mb, sub)
        if m == bb:
            return rt[m].loss(module.head(y), need, batch)
        b, target = need
        return jnp.zeros((), jnp.float32), rt[m].loss(module.head(y), target, b, batch) * spec.loss_weight[m]

    def out_zero(m):
        """A chunk's boundary output when it is not the last."""
        if m in encoders:
            return jnp.zeros(spec.boundary_shape[m], spec.dtype)
        if m == bb:
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec.carry[bb])
        return jnp.zeros((), jnp.float32)

    def cond_index(batch, mb, sub):
        """The backbone positions the generator's sub-microbatch conditions on."""
        return _sub(row(batch[rt[gen].cond_key], mb), sub, unit[gen])

    def external(m, rows, batch, mb, sub):
        """Differentiable inputs a first chunk reads from boundary buffers (`rows`: their rows
        at the op's boundary address)."""
        if m == bb:
            return dict(rows["bnd"])
        if m == gen:
            return rows["cond"][cond_index(batch, mb, sub)]
        return None

    def body_vjp(m, lp, edge, x, ext, mask, first, batch, mb, sub, store=False):
        policy = None if store or step.remat.get(m) != "layers" else jax.checkpoint_policies.nothing_saveable
        f = lambda lp, e, x, ex: body(m, lp, mask, e, x, ex, first, batch, mb, sub, policy)
        if store:       # keep the matmuls' outputs, recompute the elementwise rest in the backward
            f = jax.checkpoint(f, policy=jax.checkpoint_policies.dots_saveable)
        return jax.vjp(f, lp, edge, x, ext)

    def residual_layout(m, lp, edge, x, ext, mask, batch):
        """(shapes of the kept residuals, their layout) of a chunk of `m`: the same for every
        chunk and op of the module (the chunk stacks share one shape; `first` is traced, and the
        head is recomputed from the stored blocks' output)."""
        layout = {}

        def probe(lp, edge, x, ext, mask, first, batch, mb, sub):
            y, pull = body_vjp(m, lp, edge, x, ext, mask, first, batch, mb, sub, True)
            kept, layout["l"] = split_residuals(pull, (lp, edge))
            return [*kept, *jax.tree.leaves(y)]
        flag, i = jnp.zeros((), bool), jnp.zeros((), jnp.int32)
        shapes = jax.eval_shape(probe, lp, edge, x, ext, mask, flag, batch, i, i)
        return shapes, layout["l"]

    def chunk_residual_bytes(m, lp, edge, x, ext, mask, batch):
        """Bytes a recomputing backward of one chunk of `m` keeps (its vjp's leaves less the
        parameters), per device."""
        def probe(lp, edge, x, ext, mask, first, batch, mb, sub):
            f = lambda lp, e, x, ex: body(m, lp, mask, e, x, ex, first, batch, mb, sub)
            return split_residuals(jax.vjp(f, lp, edge, x, ext)[1], (lp, edge))[0]
        flag, i = jnp.zeros((), bool), jnp.zeros((), jnp.int32)
        return sum(k.size * k.dtype.itemsize for k in jax.eval_shape(probe, lp, edge, x, ext, mask, flag, batch, i, i))

    def per_rank(params, masks, batch, ops, recv, n_ticks):
        stacks = {m: jax.tree.map(lambda a: a[0], params[m]["blocks"]) for m in mods}
        edges = {m: nnx.State({k: v for k, v in params[m].items() if k != "blocks"}) for m in mods}
        masks = {m: a[0] for m, a in masks.items()}
        batch = jax.tree.map(lambda a: a[0], batch)
        ops, recv = ops[0, :, 0], recv[0, :, 0]
        me = lax.axis_index(STAGE)
        act = {m: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec.carry[m]) for m in mods}
        buf = lambda tree, n: jax.tree.map(lambda a: jnp.zeros((n + 1, *a.shape), a.dtype), tree)
        bufs = {"stash": {m: buf(act[m], slots[m][0]) for m in mods},
                "cot": {m: buf(act[m], slots[m][1]) for m in mods if bwd[m]},
                "bnd": {e: jnp.zeros((nb + 1, *spec.bnd_shape[e]), spec.dtype) for e in encoders},
                "bcot": {e: jnp.zeros((nb + 1, *spec.bnd_shape[e]), spec.dtype) for e in encoders if bwd[e]}}
        if gen is not None:
            S_ = batch[rt[bb].batch_keys[0]].shape[-1]
            for k in ("cond", "hcot", "hacc"):
                bufs[k] = jnp.zeros((nc + 1, S_, D), spec.dtype)
        flat = FlatGrads({m: stacks[m] for m in mods if bwd[m]}, {m: edges[m] for m in mods if bwd[m]})
        grads = flat.zeros()
        for m in mods:
            if bwd[m]:
                step.remat[m] = remat if remat != "auto" else (
                    "layers" if chunk_residual_bytes(m, take(stacks[m], 0), edges[m], act[m],
                                                     external(m, take({"bnd": bufs["bnd"], "cond": bufs.get("cond")}, 0),
                                                              batch, 0, 0),
                                                     row(masks[m], 0), batch) > REMAT_AUTO_BYTES else "chunk")
        layout, res_zero, packs = {}, {}, {}
        bufs["res"] = {}
        for m in mods:
            if nres[m]:
                ext = external(m, take({"bnd": bufs["bnd"], "cond": bufs.get("cond")}, 0), batch, 0, 0)
                kept, layout[m] = residual_layout(m, take(stacks[m], 0), edges[m], act[m], ext, row(masks[m], 0), batch)
                step.residual_bytes[m] = sum(k.size * k.dtype.itemsize for k in kept)
                packs[m] = Packed(kept)
                bufs["res"][m] = packs[m].zeros((nres[m] + 1,))
                res_zero[m] = packs[m].zeros()
        f_table, b_table = branch_table(fwd_branches), branch_table(bwd_branches)
        chunks_of = jnp.asarray([n_chunks[m] for m in mods], jnp.int32)
        stack_at = jnp.asarray([flat.stack_at.get(m, 0) for m in mods], jnp.int32)
        chunk_w = jnp.asarray([flat.chunk.get(m, 0) for m in mods], jnp.int32)
        edge_at = jnp.asarray([flat.edge_at.get(m, 0) for m in mods], jnp.int32)

        def placed(op, m_col, v_col):
            """(the op's module, whether its chunk is the module's first, its last)."""
            mod, pos = op[m_col], op[v_col] * Pn + me
            return mod, pos == 0, pos == row(chunks_of, mod) - 1

        def tick(t, carry):
            bufs, grads, loss = carry
            op, rc = row(ops, t), row(recv, t)
            # Every buffer read happens here, before any write and outside the switches.
            f_mb, f_sub, f_aux, f_v = op[T.F_MB], op[T.F_SUB], op[T.F_AUX], op[T.F_V]
            b_mb, b_sub, b_aux, b_v = op[T.B_MB], op[T.B_SUB], op[T.B_AUX], op[T.B_V]
            f_in, b_in = {}, {}
            for m in mods:
                f_in[m], b_in[m] = take2(bufs["stash"][m], op[T.F_IN], op[T.B_IN])
            bnd_f, bnd_b = take2({"bnd": bufs["bnd"], "cond": bufs.get("cond")}, f_aux, b_aux)
            f_ext = {m: external(m, bnd_f, batch, f_mb, f_sub) for m in mods}
            b_ext = {m: external(m, bnd_b, batch, b_mb, b_sub) for m in mods if bwd[m]}
            ct_in = {m: take(bufs["cot"][m], op[T.B_COT]) for m in mods if bwd[m]}
            res_in = {m: take2(bufs["res"][m], op[T.B_RES], op[T.B_RES])[0] for m in bufs["res"]}
            hrow = row(bufs["hacc"], b_aux) if gen is not None and bwd[gen] else None
            ct_head = {}
            for m in mods:
                if m in encoders and bwd[m]:
                    ct_head[m] = row(row(bufs["bcot"][m], b_aux), b_sub)
                elif m == bb and gen is not None:      # a trash address: this microbatch has no generator items
                    ct_head[m] = jnp.where(b_aux < nc, row(bufs["hcot"], b_aux), 0.0)[None]

            # the forward op
            f_mod, f_first, f_last = placed(op, T.F_MOD, T.F_V)
            f_store = op[T.F_STORE] == 1
            f_idx = jnp.where(op[T.F_ON] == 1, f_table[f_mod, f_last.astype(jnp.int32), f_store.astype(jnp.int32)], 0)
            f_zero = ({m: act[m] for m in mods}, {m: out_zero(m) for m in mods}, jnp.zeros((), jnp.float32),
                      {m: res_zero[m] for m in res_zero})

            def fwd(m, last, store):
                def run():
                    lp, mask = take(stacks[m], f_v), row(masks[m], f_v)
                    if store:
                        y, pull = body_vjp(m, lp, edges[m], f_in[m], f_ext[m], mask, f_first, batch, f_mb, f_sub, True)
                        kept = [*split_residuals(pull, (lp, edges[m]))[0], *jax.tree.leaves(y)]
                    else:
                        y = body(m, lp, mask, edges[m], f_in[m], f_ext[m], f_first, batch, f_mb, f_sub)
                    out, l = head(m, lp, edges[m], y, f_ext[m], batch, f_mb, f_sub) if last else (out_zero(m), 0.0)
                    ys, outs, _, res = f_zero
                    res = {**res, m: packs[m].pack(kept)} if store else res
                    return {**ys, m: y}, {**outs, m: out}, jnp.asarray(l, jnp.float32), res
                return run
            ys, outs, l, kept = lax.switch(f_idx, [lambda: f_zero] + [fwd(*k) for k in fwd_branches])
            loss = loss + l

            # the backward op
            b_mod, b_first, b_last = placed(op, T.B_MOD, T.B_V)
            b_stored = op[T.B_STORE] == 1
            b_idx = jnp.where(op[T.B_ON] == 1, b_table[b_mod, b_last.astype(jnp.int32), b_stored.astype(jnp.int32)], 0)
            pay_zero = {}
            if bwd.get(bb) and encoders:
                pay_zero[bb] = {e: jnp.zeros(spec.bnd_shape[e], spec.dtype) for e in encoders}
            if gen is not None and bwd[gen]:
                pay_zero[gen] = jnp.zeros_like(hrow)
            b_zero = ({m: act[m] for m in mods if bwd[m]}, pay_zero,
                      jnp.zeros((flat.w_stack,), flat.dtype), jnp.zeros((flat.w_edge,), flat.dtype))

            def bwd_op(m, last, stored):
                def run():
                    lp, mask = take(stacks[m], b_v), row(masks[m], b_v)
                    if stored:
                        ydef = jax.tree.structure(act[m])
                        kept = packs[m].unpack(res_in[m])
                        kept, ys_ = kept[:-ydef.num_leaves], kept[-ydef.num_leaves:]
                        y, pull = jax.tree.unflatten(ydef, ys_), join_residuals(kept, layout[m], (lp, edges[m]))
                    else:
                        y, pull = body_vjp(m, lp, edges[m], b_in[m], b_ext[m], mask, b_first, batch, b_mb, b_sub)
                    if last:
                        (out, _), pull_head = jax.vjp(lambda e, y, ex: head(m, lp, e, y, ex, batch, b_mb, b_sub),
                                                      edges[m], y, b_ext[m])
                        ct_out = ct_head[m] if m in ct_head else jnp.zeros_like(out)
                        g_eh, ct_y, g_exh = pull_head((ct_out, jnp.ones((), jnp.float32)))
                    else:
                        ct_y = ct_in[m]
                    g_lp, g_e, g_x, g_ext = pull(ct_y)
                    if last:
                        g_e = jax.tree.map(jnp.add, g_e, g_eh)
                        g_ext = jax.tree.map(jnp.add, g_ext, g_exh)
                    gx, pay, _, _ = b_zero
                    if m == bb and bb in pay:
                        pay = {**pay, bb: g_ext}
                    if m == gen:
                        idx = cond_index(batch, b_mb, b_sub)
                        pay = {**pay, gen: jnp.where(op[T.B_FIRST] == 1, 0.0, hrow).at[idx].add(g_ext)}
                    return {**gx, m: g_x}, pay, flat.flat(g_lp, flat.w_stack), flat.flat(g_e, flat.w_edge)
                return run
            gx, pay, g_stack, g_edge = lax.switch(b_idx, [lambda: b_zero] + [bwd_op(*k) for k in bwd_branches])
            b_on = op[T.B_ON] == 1
            grads = flat.add(grads, jnp.where(b_on, row(stack_at, b_mod) + b_v * row(chunk_w, b_mod), 0), g_stack)
            grads = flat.add(grads, jnp.where(b_on, row(edge_at, b_mod), 0), g_edge)

            # writes, then communication: one packed collective per direction carries every channel.
            # The barrier orders every read of this tick before every write: without it the reads
            # for the backward (which no write depends on) could run late, and XLA copies each
            # buffer twice to keep them safe.
            res = bufs["res"]
            bufs, _ = lax.optimization_barrier(({k: v for k, v in bufs.items() if k != "res"},
                                                (ys, outs, kept, gx, pay, g_stack, g_edge)))
            new = dict(bufs)
            f_on = op[T.F_ON] == 1
            if gen is not None and bwd[gen]:
                at = jnp.where(b_on & (b_mod == kid[gen]) & b_first, b_aux, nc)
                new["hacc"] = put(bufs["hacc"], at, pay[gen])
            sent_up = {"act": ys, "bnd": {e: outs[e] for e in encoders}}
            sent_down = {"cot": gx, "bcot": {e: pay[bb][e] for e in encoders if bwd[e] and bwd[bb]}}
            if gen is not None:
                sent_up["cond"] = outs[bb][0]
                if bwd[gen]:
                    sent_down["hcot"] = pay[gen]
            up, down = send(sent_up, fwd_perm), send(sent_down, bwd_perm)
            # The written row reads (never selects) the row read this tick: only an update that
            # depends on the read makes XLA order the read first and update the buffer in place
            # (a barrier does not; without it each residual buffer is copied twice a tick).
            never = op[T.F_ON] > 1
            res_at = {m: jnp.where(f_on & f_store & (f_mod == kid[m]), op[T.F_RES], nres[m]) for m in res}
            new["res"] = {m: {d: put(res[m][d], res_at[m], jnp.where(never, res_in[m][d], kept[m][d])) for d in res[m]}
                          for m in res}
            stash, cot = dict(bufs["stash"]), dict(bufs.get("cot", {}))
            for m in mods:
                stash[m] = jax.tree.map(lambda B_, y: put(B_, rc[cols[f"f:{m}"]], y), stash[m], up["act"][m])
                if bwd[m]:
                    cot[m] = jax.tree.map(lambda B_, g: put(B_, rc[cols[f"b:{m}"]], g), cot[m], down["cot"][m])
            new["stash"], new["cot"] = stash, cot
            bnd, bcot = dict(bufs["bnd"]), dict(bufs["bcot"])
            for e in encoders:
                val, s, u = up["bnd"][e], rc[cols[f"bnd:{e}"]], rc[cols[f"bnd_sub:{e}"]]
                bnd[e] = lax.dynamic_update_slice(bnd[e], val[None, None], (s, u) + (0,) * val.ndim)
                if e in down["bcot"]:
                    bcot[e] = put(bcot[e], rc[cols[f"bcot:{e}"]], down["bcot"][e])
            new["bnd"], new["bcot"] = bnd, bcot
            if gen is not None:
                new["cond"] = put(bufs["cond"], rc[cols["cond"]], up["cond"])
                if bwd[gen]:
                    new["hcot"] = put(bufs["hcot"], rc[cols["hcot"]], down["hcot"])
            return new, grads, loss

        bufs, grads, loss = lax.fori_loop(0, n_ticks, tick, (bufs, grads, jnp.zeros((), jnp.float32)))
        grads = grads.at[flat.loss_at].set(loss.astype(flat.dtype))
        # the flat buffer is the step's output (no second copy of the gradients): reduced in
        # place over the replicas, its replicated parameters' part and the loss over the stages
        # too (a mesh axis of size 1: nothing)
        if packed:
            if mesh.shape[REPLICA] > 1:
                grads = lax.psum(grads, REPLICA)
            if Pn > 1:
                edge_part = lax.psum(grads[flat.edges_from:flat.loss_at + 1], STAGE)
                grads = lax.dynamic_update_slice(grads, edge_part, (flat.edges_from,))
        else:                   # one reduction per leaf (the packing tests' negative control)
            g_stacks, g_edges, loss = flat.unflatten(*flat.parts(grads))
            g_stacks = reduce(g_stacks, REPLICA)
            loss, g_edges = reduce((loss, g_edges), (STAGE, REPLICA))
            grads = flat.zeros()
            for m in g_stacks:
                for v in range(flat.n_chunks[m]):
                    grads = flat.add(grads, flat.stack_at[m] + v * flat.chunk[m], flat.flat(take(g_stacks[m], v), flat.chunk[m]))
                grads = flat.add(grads, flat.edge_at[m], flat.flat(g_edges[m], flat.edge[m]))
            grads = grads.at[flat.loss_at].set(loss.astype(flat.dtype))
        return grads[flat.loss_at].astype(jnp.float32), grads[None]

    def local_flat(params):
        stacks = {m: jax.tree.map(lambda a: a[0], params[m]["blocks"]) for m in mods if bwd[m]}
        edges = {m: nnx.State({k: v for k, v in params[m].items() if k != "blocks"}) for m in mods if bwd[m]}
        return FlatGrads(stacks, edges)

    def unflatten_rank(params, grads):
        flat = local_flat(params)
        g_stacks, g_edges, _ = flat.unflatten(*flat.parts(grads[0]))
        out = {}
        for m in g_stacks:
            g = {"blocks": jax.tree.map(lambda g: g[None], g_stacks[m]), **g_edges[m]}
            out[m] = like(params[m], nnx.State(g))
        return out

    def param_specs(tree):
        return S.state_specs(mesh, tree, mods, True)

    flat_spec = jax.sharding.PartitionSpec(tuple(a for a in (STAGE, TENSOR) if a in mesh.shape))

    def step(params, masks, batch, ops, recv, n_ticks):
        fn = jax.shard_map(per_rank, mesh=mesh, check_vma=False,
                           in_specs=(param_specs(params), S.spec("stage"), S.spec(*S.REPLICA_BATCH),
                                     S.spec(*S.TABLE), S.spec(*S.TABLE), S.spec(*S.SCALAR)),
                           out_specs=(S.spec(*S.SCALAR), flat_spec))
        return fn(params, masks, batch, ops, recv, n_ticks)

    def unflatten(params, grads):
        """The step's flat gradients -> per module with backward ops, in the parameters' layout."""
        grads_like = {m: params[m] for m in mods if bwd[m]}
        fn = jax.shard_map(unflatten_rank, mesh=mesh, check_vma=False, in_specs=(param_specs(params), flat_spec),
                           out_specs=param_specs(grads_like))
        return fn(params, grads)
    step.unflatten = unflatten
    step.remat = {}                  # per module with backward ops: chunk | layers (set when traced)
    step.residual_bytes = {}         # per module with residual slots: bytes of one slot per device (set when traced)
    return step
