"""The generic table-driven pipeline step: one compiled shard_map program runs any plan.

Per rank: a fori_loop over the traced `n_ticks`; each tick, for every module, one predicated
while_loop (trip count 0 or 1) for a forward and one for a backward op (the table turns on at
most one of each), then one packed ppermute to rank+1 (activations, encoder outputs, llm
states) and one to rank-1 (cotangents), wrapping around, written into table-addressed slots (a
trash slot when nothing is due). The memory strategy is per op, in the table: a backward
recomputes its chunk under jax.vjp from the stashed input, or, when its forward stored the
chunk's residuals (the leaves of its vjp function under jax.checkpoint's `dots_saveable`: the
matmuls' outputs, less the parameters it reads again), applies them and recomputes only the
elementwise rest. Indexing is dynamic_index / dynamic_update_index only. Data-parallel replicas run their own tables;
gradients are reduced once, after the loop. The runtime holds no scheduling logic.

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


def build_step(spec, sig: T.Signature, mesh, packed: bool = True, drop_tensor_reductions: bool = False):
    """spec: runtime.pipeline.ExecSpec (module graphdefs, runtime specs, shapes). Returns the (unjitted) step

    step(params, masks, batch, ops, recv, n_ticks) -> (loss, grads)

    `params`: per module, the stage-layout parameters (block stacks [P, K, Lc, ...] split over
    the stages, other parameters replicated); `grads` has their layout, for the modules with
    backward ops, reduced over the data replicas. `packed=False` sends one collective per
    channel and gradient leaf (what a tick and a step cost before packing; kept to measure it and
    for the HLO lint's negative control). The program is manual over every mesh axis; with a
    'tensor' axis each device runs its chunks on its own share of the blocks' heads and hidden
    units, and runtime/tensor.py adds the group's all-reduces (`drop_tensor_reductions` leaves
    them out: the tensor tests' negative control).
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

    def module_of(m, layer_p, edge):
        return nnx.merge(spec.graphdef[m], nnx.State({"blocks": layer_p}), edge)

    def blocks(m, layer_p, layer_mask, module, carry, ctx):
        block_def = spec.block_def[m]
        merge = (lambda p: split_block(nnx.merge(block_def, p), TENSOR, drop_tensor_reductions)) if tensor_split \
            else (lambda p: nnx.merge(block_def, p))

        def body(c, lp):
            p, keep = lp
            return _where(keep, module.step(merge(p), c, ctx), c), None
        return lax.scan(body, carry, (layer_p, layer_mask))[0]

    def chunk(m, layer_p, layer_mask, edge, x_stash, ext, first, last, batch, mb, sub):
        """One op's forward: (embed if first) -> masked layers -> (head / loss if last).
        Returns (carry out, boundary out, loss)."""
        module = module_of(m, layer_p, edge)
        u = unit[m]
        if m in encoders:
            raw = _sub(row(batch[spec.encoder_input[m][0]], mb), sub, u)
            x = _where(first, module.embed(raw), x_stash)
            y = blocks(m, layer_p, layer_mask, module, x, None)
            out = lax.cond(last, module.head, lambda y: jnp.zeros(spec.boundary_shape[m], spec.dtype), y)
            return y, out, jnp.zeros((), jnp.float32)
        r = rt[m]
        if m == bb:
            b = {k: row(batch[k], mb)[None] for k in r.batch_keys}
            merges = tuple((ext[e].reshape(1, -1, D), row(batch[spec.encoder_input[e][1]], mb)[None])
                           for e in encoders)
            inputs = r.inputs(b, merges)
            x = _where(first, module.embed(inputs), x_stash)
            y = blocks(m, layer_p, layer_mask, module, x, module.context(inputs))
            hidden, loss = lax.cond(last, lambda y: r.loss(module.head(y), b, batch),
                                    lambda y: (jnp.zeros_like(y), jnp.zeros((), jnp.float32)), y)
            return y, hidden, loss
        # the generator
        b = {k: _sub(row(batch[k], mb), sub, u) for k in r.batch_keys}
        inputs, target = r.inputs(b, ext)
        x = _where(first, module.embed(inputs), x_stash)
        y = blocks(m, layer_p, layer_mask, module, x, module.context(inputs))
        loss = lax.cond(last, lambda y: r.loss(module.head(y), target, b, batch) * spec.loss_weight[m],
                        lambda y: jnp.zeros((), jnp.float32), y)
        return y, jnp.zeros((), jnp.float32), loss

    def cond_index(batch, mb, sub):
        """The backbone positions the generator's sub-microbatch conditions on."""
        return _sub(row(batch[rt[gen].cond_key], mb), sub, unit[gen])

    def external(m, bufs, aux, batch, mb, sub):
        """Differentiable inputs a first chunk reads from boundary buffers."""
        if m == bb:
            return {e: row(bufs["bnd"][e], aux) for e in encoders}
        if m == gen:
            return row(bufs["cond"], aux)[cond_index(batch, mb, sub)]
        return None

    def chunk_vjp(m, lp, edge, x, ext, mask, first, last, batch, mb, sub, store=False):
        f = lambda lp, e, x, ex: chunk(m, lp, mask, e, x, ex, first, last, batch, mb, sub)
        if store:       # keep the matmuls' outputs, recompute the elementwise rest in the backward
            f = jax.checkpoint(f, policy=jax.checkpoint_policies.dots_saveable)
        return jax.vjp(f, lp, edge, x, ext)

    def residual_layout(m, lp, edge, x, ext, mask, batch):
        """(shapes of the kept residuals, their layout) of a chunk of `m`: the same for every
        chunk and op of the module (the chunk stacks share one shape; first/last are traced)."""
        layout = {}

        def probe(lp, edge, x, ext, mask, first, last, batch, mb, sub):
            kept, layout["l"] = split_residuals(chunk_vjp(m, lp, edge, x, ext, mask, first, last, batch, mb, sub, True)[1],
                                                (lp, edge))
            return kept
        flag, i = jnp.zeros((), bool), jnp.zeros((), jnp.int32)
        shapes = jax.eval_shape(probe, lp, edge, x, ext, mask, flag, flag, batch, i, i)
        return shapes, layout["l"]

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
            S = batch[rt[bb].batch_keys[0]].shape[-1]
            for k in ("cond", "hcot", "hacc"):
                bufs[k] = jnp.zeros((nc + 1, S, D), spec.dtype)
        grads = {"stacks": {m: zeros(stacks[m]) for m in mods if bwd[m]},
                 "edges": {m: zeros(edges[m]) for m in mods if bwd[m]}}
        layout, bufs["res"] = {}, {}
        for m in mods:
            if nres[m]:
                ext = external(m, bufs, 0, batch, 0, 0)
                kept, layout[m] = residual_layout(m, take(stacks[m], 0), edges[m], act[m], ext, row(masks[m], 0), batch)
                step.residual_bytes[m] = sum(k.size * k.dtype.itemsize for k in kept)
                bufs["res"][m] = [jnp.zeros((nres[m] + 1, *k.shape), k.dtype) for k in kept]

        def position(v, m):
            c = v * Pn + me
            return c == 0, c == n_chunks[m] - 1

        def tick(t, carry):
            bufs, grads, loss = carry
            op, rc = row(ops, t), row(recv, t)
            f_out, b_out = {}, {}
            grads = {"stacks": dict(grads["stacks"]), "edges": dict(grads["edges"])}
            # Every buffer read happens here, outside the predicated bodies: a body that reads a
            # buffer written after it would make XLA copy the whole buffer every tick.
            res = dict(bufs["res"])
            for m in mods:
                mb, sub, aux, v = op[T.F_MB], op[T.F_SUB], op[T.F_AUX], op[T.F_V]
                x_in = take(bufs["stash"][m], op[T.F_IN])
                ext = external(m, bufs, aux, batch, mb, sub)

                def fwd(c, m=m, x_in=x_in, ext=ext, mb=mb, sub=sub, v=v):
                    go, _, _, loss = c
                    first, last = position(v, m)
                    y, out, l = chunk(m, take(stacks[m], v), row(masks[m], v), edges[m], x_in, ext,
                                      first, last, batch, mb, sub)
                    return go & False, y, out, loss + l

                def fwd_store(c, m=m, x_in=x_in, ext=ext, mb=mb, sub=sub, v=v):
                    go, _, _, loss, buf = c
                    first, last = position(v, m)
                    lp = take(stacks[m], v)
                    (y, out, l), pull = chunk_vjp(m, lp, edges[m], x_in, ext, row(masks[m], v), first, last,
                                                  batch, mb, sub, True)
                    kept = split_residuals(pull, (lp, edges[m]))[0]
                    return go & False, y, out, loss + l, [put(B_, op[T.F_RES], k) for B_, k in zip(buf, kept)]
                out0 = (jnp.zeros(spec.boundary_shape[m], spec.dtype) if m in encoders else
                        act[bb] if m == bb else jnp.zeros((), jnp.float32))
                go = (op[T.F_ON] == 1) & (op[T.F_MOD] == kid[m])
                stores = op[T.F_STORE] == 1
                _, y, out, loss = lax.while_loop(lambda c: c[0], fwd, (go & ~stores if nres[m] else go, act[m], out0, loss))
                if nres[m]:
                    # the body writes its slot of the residual buffer in place; the backward reads
                    # the buffer only after this loop (a slot is never written and read in one
                    # tick, tables.py), so nothing else holds it and nothing is copied
                    _, y, out, loss, res[m] = lax.while_loop(lambda c: c[0], fwd_store, (go & stores, y, out, loss, res[m]))
                f_out[m] = (y, out, out0)
            res_in = {m: take(res[m], op[T.B_RES]) for m in res}
            for m in mods:
                if not bwd[m]:
                    continue
                mb, sub, aux, v = op[T.B_MB], op[T.B_SUB], op[T.B_AUX], op[T.B_V]
                x_in = take(bufs["stash"][m], op[T.B_IN])
                ext = external(m, bufs, aux, batch, mb, sub)
                ct_in = take(bufs["cot"][m], op[T.B_COT])
                if m in encoders:
                    ct_head = row(row(bufs["bcot"][m], aux), sub)
                elif m == bb and gen is not None:      # a trash address: this microbatch has no generator items
                    ct_head = jnp.where(aux < nc, row(bufs["hcot"], aux), 0.0)[None]
                else:
                    ct_head = None

                def recompute(first, last, m=m, x_in=x_in, ext=ext, mb=mb, sub=sub, v=v):
                    (y, out, _), pull = chunk_vjp(m, take(stacks[m], v), edges[m], x_in, ext, row(masks[m], v),
                                                  first, last, batch, mb, sub)
                    return y, out, pull

                def restore(first, last, m=m, v=v):
                    pull = join_residuals(res_in[m], layout[m], (take(stacks[m], v), edges[m]))
                    return act[m], f_out[m][2], pull

                def bwd_body(c, pull_of, m=m, ct_in=ct_in, ct_head=ct_head, mb=mb, sub=sub, aux=aux, v=v):
                    go, _, _, hacc, g_stack, g_edge = c
                    first, last = position(v, m)
                    y, out, pull = pull_of(first, last)
                    ct_y = _where(last, zeros(y), ct_in)
                    ct_out = jnp.zeros_like(out) if ct_head is None else jnp.where(last, ct_head, 0.0)
                    g_lp, g_e, g_x, g_ext = pull((ct_y, ct_out, jnp.where(last, 1.0, 0.0).astype(jnp.float32)))
                    g_stack = jax.tree.map(lambda G, g: put(G, v, row(G, v) + g), g_stack, g_lp)
                    g_edge = jax.tree.map(jnp.add, g_edge, g_e)
                    payload = g_ext if m == bb else jnp.zeros((), jnp.float32)
                    if m == gen:
                        idx = cond_index(batch, mb, sub)
                        acc = jnp.where(op[T.B_FIRST] == 1, 0.0, row(hacc, aux)).at[idx].add(g_ext)
                        hacc = put(hacc, aux, jnp.where(first, acc, row(hacc, aux)))
                        payload = acc
                    return go & False, g_x, payload, hacc, g_stack, g_edge

                pay0 = ({e: jnp.zeros(spec.bnd_shape[e], spec.dtype) for e in encoders} if m == bb else
                        bufs["hacc"][0] if m == gen else jnp.zeros((), jnp.float32))
                go = (op[T.B_ON] == 1) & (op[T.B_MOD] == kid[m])
                stored = op[T.B_STORE] == 1
                hacc = bufs["hacc"] if m == gen else jnp.zeros((), jnp.float32)   # a buffer a body writes
                c = (go & ~stored if nres[m] else go, act[m], pay0, hacc, grads["stacks"][m], grads["edges"][m])
                c = lax.while_loop(lambda c: c[0], lambda c, f=recompute: bwd_body(c, f), c)
                if nres[m]:
                    c = lax.while_loop(lambda c: c[0], lambda c, f=restore: bwd_body(c, f), (go & stored, *c[1:]))
                _, gx, payload, hacc, grads["stacks"][m], grads["edges"][m] = c
                if m == gen:
                    bufs = {**bufs, "hacc": hacc}
                b_out[m] = (gx, payload)
            # communication, every tick: one packed collective per direction carries every channel
            sent_up = {"act": {m: f_out[m][0] for m in mods}, "bnd": {e: f_out[e][1] for e in encoders}}
            sent_down = {"cot": {m: b_out[m][0] for m in mods if bwd[m]},
                         "bcot": {e: b_out[bb][1][e] for e in encoders if bwd[e] and bwd[bb]}}
            if gen is not None:
                sent_up["cond"] = f_out[bb][1][0]
                if bwd[gen]:
                    sent_down["hcot"] = b_out[gen][1]
            up, down = send(sent_up, fwd_perm), send(sent_down, bwd_perm)
            new = dict(bufs)
            new["res"] = res
            stash, cot = dict(bufs["stash"]), dict(bufs.get("cot", {}))
            for m in mods:
                stash[m] = jax.tree.map(lambda B_, y: put(B_, rc[cols[f"f:{m}"]], y), stash[m], up["act"][m])
                if bwd[m]:
                    cot[m] = jax.tree.map(lambda B_, g: put(B_, rc[cols[f"b:{m}"]], g), cot[m], down["cot"][m])
            new["stash"], new["cot"] = stash, cot
            bnd, bcot = dict(bufs["bnd"]), dict(bufs["bcot"])
            for e in encoders:
                val, s, u = up["bnd"][e], rc[cols[f"bnd:{e}"]], rc[cols[f"bnd_sub:{e}"]]
                bnd[e] = put(bnd[e], s, put(row(bnd[e], s), u, val))
                if e in down["bcot"]:
                    bcot[e] = put(bcot[e], rc[cols[f"bcot:{e}"]], down["bcot"][e])
            new["bnd"], new["bcot"] = bnd, bcot
            if gen is not None:
                new["cond"] = put(bufs["cond"], rc[cols["cond"]], up["cond"])
                if bwd[gen]:
                    new["hcot"] = put(bufs["hcot"], rc[cols["hcot"]], down["hcot"])
            return new, grads, loss

        bufs, grads, loss = lax.fori_loop(0, n_ticks, tick, (bufs, grads, jnp.zeros((), jnp.float32)))
        # two packed reductions: stage stacks over the replicas, everything replicated over all
        stacks = reduce(grads["stacks"], REPLICA)
        loss, edges = reduce((loss, grads["edges"]), (STAGE, REPLICA))
        out = {}
        for m in stacks:
            g = {"blocks": jax.tree.map(lambda g: g[None], stacks[m]), **edges[m]}
            out[m] = like(params[m], nnx.State(g))
        return loss, out

    def param_specs(tree):
        return S.state_specs(mesh, tree, mods, True)

    def step(params, masks, batch, ops, recv, n_ticks):
        grads_like = {m: params[m] for m in mods if bwd[m]}
        fn = jax.shard_map(per_rank, mesh=mesh, check_vma=False,
                           in_specs=(param_specs(params), S.spec("stage"), S.spec(*S.REPLICA_BATCH),
                                     S.spec(*S.TABLE), S.spec(*S.TABLE), S.spec(*S.SCALAR)),
                           out_specs=(S.spec(*S.SCALAR), param_specs(grads_like)))
        return fn(params, masks, batch, ops, recv, n_ticks)
    step.residual_bytes = {}         # per module with residual slots: bytes of one slot per device (set when traced)
    return step
