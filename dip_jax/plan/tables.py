"""Plan -> the int32 tick table the executor runs (pure Python + numpy).

Ticks come from the lock-step simulation (at most one forward and one backward op per rank per
tick, inputs produced in an earlier tick). Buffer slots come from interval colouring: a stash
slot holds a chunk's input from the end of the tick it arrives in until the backward that
reads it; a cotangent slot holds an arriving cotangent until its backward; boundary slots hold a
microbatch's encoder outputs (rank 0, until the backbone's first-chunk backward), the
backbone's cotangents for them (rank P-1), the backbone states the generator conditions on
(rank 0) and the generator's accumulated cotangent for them (rank P-1). A forward that stores its residuals (Plan.stored) frees its stash slot when it runs
and holds a residual slot until its backward. Every channel delivers something every tick; what
is not due lands in the trash slot (the last one). Validation here is the only bounds check: the
device code clamps indices silently.
"""
from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from dip_jax.plan.indexed import Indexed
from dip_jax.plan.schedule import B, BACKBONE, ENCODER, F, GENERATOR, Op, Plan
from dip_jax.plan.validate import validate
from dip_jax.plan.simulate import Costs, run

# columns of ops[t, rank, :]
(F_ON, F_MOD, F_V, F_MB, F_SUB, F_IN, F_AUX,
 B_ON, B_MOD, B_V, B_MB, B_SUB, B_IN, B_COT, B_AUX, B_FIRST,
 F_STORE, F_RES, B_STORE, B_RES) = range(20)
OP_FIELDS = 20


def bucket(n: int, minimum: int = 2) -> int:
    """Next power of two >= n (>= minimum): the few sizes compiled programs are keyed by."""
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass(frozen=True)
class Signature:
    """Static shapes of a table: equal signature = same compiled program."""
    P: int
    modules: tuple[str, ...]
    chunks_per_rank: tuple[int, ...]
    units: tuple[int, ...]
    backward: tuple[bool, ...]
    stash_slots: tuple[int, ...]
    cot_slots: tuple[int, ...]
    boundary_slots: int          # encoder outputs and their cotangents, per microbatch
    cond_slots: int              # backbone states for the generator and their cotangents, per microbatch
    t_max: int
    roles: tuple[str, ...] = ()
    res_slots: tuple[int, ...] = ()       # residual slots per module (0: no op stores, no buffer)

    def residual_slots(self, module: str) -> int:
        return self.res_slots[self.modules.index(module)] if self.res_slots else 0

    def recv_columns(self) -> dict[str, int]:
        """Column of each receive address in recv[t, rank, :]."""
        cols = {}
        for m in self.modules:
            cols[f"f:{m}"] = len(cols)
            cols[f"b:{m}"] = len(cols)
        for e in self.encoders:
            cols[f"bnd:{e}"] = len(cols)
            cols[f"bnd_sub:{e}"] = len(cols)
            cols[f"bcot:{e}"] = len(cols)
        if self.generator is not None:
            cols["cond"] = len(cols)
            cols["hcot"] = len(cols)
        return cols

    def _with(self, role: str) -> tuple[str, ...]:
        return tuple(m for m, r in zip(self.modules, self.roles) if r == role)

    @property
    def encoders(self) -> tuple[str, ...]:
        return self._with(ENCODER)

    @property
    def backbone(self) -> str | None:
        return next(iter(self._with(BACKBONE)), None)

    @property
    def generator(self) -> str | None:
        return next(iter(self._with(GENERATOR)), None)


@dataclasses.dataclass
class Table:
    ops: np.ndarray            # int32 [T_max, P, OP_FIELDS]
    recv: np.ndarray           # int32 [T_max, P, len(signature.recv_columns())]
    n_ticks: int
    signature: Signature


def colour(intervals):
    """[(start, end, key)] -> ({key: slot}, slots used). A slot read at tick t can take an
    arrival written at the end of tick t."""
    free, busy, slot, n = [], [], {}, 0
    for start, end, key in sorted(intervals, key=lambda x: (x[0], x[1], str(x[2]))):
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        s = heapq.heappop(free) if free else n
        n = max(n, s + 1)
        slot[key] = s
        heapq.heappush(busy, (end, s))
    return slot, n


def ticks_of(plan: Plan) -> dict[Op, int]:
    g = plan.graph
    ix = Indexed(g, Costs(latency=lambda op: 1.0))
    _, _, tick, _ = run(ix, ix.order_ids(plan), "lockstep")
    return {ix.ops[i]: tick[i] for i in range(ix.n)}


def needs(plan: Plan) -> dict:
    """Slots and ticks a plan needs (to choose buckets for a set of plans)."""
    return _allocate(plan, ticks_of(plan))[-1]


STASH_MIN = 4      # activation slots per module at least: the smallest schedules' needs, one program


def buckets_for(plans: list[Plan]) -> dict:
    """Buffer and table sizes that fit every plan of `plans`, rounded up to powers of two."""
    ns = [needs(p) for p in plans]
    most = lambda key: max(n[key] for n in ns)
    mods = ns[0]["stash"]
    return {"stash": {m: bucket(max(n["stash"][m] for n in ns), STASH_MIN) for m in mods},
            "cot": {m: bucket(max(n["cot"][m] for n in ns)) for m in mods},
            "res": {m: residual_bucket(max(n["res"][m] for n in ns)) for m in mods},
            "boundary": bucket(most("boundary")), "cond": bucket(most("cond")), "t_max": bucket(most("ticks"), 8)}


def residual_bucket(n: int) -> int:
    """Residual slots: none while nothing stores (the recompute-only program has no residual
    buffers at all), else a power of two."""
    return bucket(n) if n else 0


def widen(a: dict, b: dict) -> dict:
    """The larger of two bucket sets, field by field (so a run's buckets only ever grow)."""
    return {k: widen(v, b.get(k, {})) if isinstance(v, dict) else max(v, b.get(k, 0)) for k, v in a.items()}


def _allocate(plan: Plan, tick: dict[Op, int]):
    g = plan.graph
    P = g.P
    mods = [m.name for m in g.modules]
    stash, cot, res = {}, {}, {}
    for m in g.modules:
        for r in range(P):
            s_iv, c_iv, r_iv = [], [], []
            for op, t in tick.items():
                if op.module != m.name or g.rank(op) != r:
                    continue
                stores = op.kind == F and op in plan.stored
                if stores:       # held through its backward's tick: that tick's forward writes first
                    r_iv.append((t, tick[Op(B, op.module, op.chunk, op.mb, op.sub)] + 1, op))
                if op.kind == F and op.chunk > 0:
                    read = t if stores or not m.backward else tick[Op(B, op.module, op.chunk, op.mb, op.sub)]
                    s_iv.append((tick[Op(F, op.module, op.chunk - 1, op.mb, op.sub)], read, op))
                if op.kind == B and op.chunk < m.chunks - 1:
                    c_iv.append((tick[Op(B, op.module, op.chunk + 1, op.mb, op.sub)], t, op))
            stash[(m.name, r)] = colour(s_iv)
            cot[(m.name, r)] = colour(c_iv)
            res[(m.name, r)] = colour(r_iv)
    enc, bb, gen = g.encoders, g.backbone, g.generator
    bnd_iv, bcot_iv, cond_iv, hcot_iv = [], [], [], []
    if bb is not None:
        back = g.module(bb)
        last_bb = back.chunks - 1
        for mb in range(g.microbatches):
            outs = [tick[Op(F, e, g.module(e).chunks - 1, mb, u)] for e in enc for u in range(g.n_subs(e, mb))]
            if outs:
                use = tick[Op(B, bb, 0, mb)] if back.backward else tick[Op(F, bb, 0, mb)]
                bnd_iv.append((min(outs), use, mb))
                reads = [tick[Op(B, e, g.module(e).chunks - 1, mb, u)] for e in enc if g.module(e).backward
                         for u in range(g.n_subs(e, mb))]
                if reads and back.backward:
                    bcot_iv.append((tick[Op(B, bb, 0, mb)], max(reads), mb))
            if gen is not None and g.n_subs(gen, mb):
                gm = g.module(gen)
                subs = range(g.n_subs(gen, mb))
                uses = [tick[Op(B if gm.backward else F, gen, 0, mb, u)] for u in subs]
                cond_iv.append((tick[Op(F, bb, last_bb, mb)], max(uses), mb))
                if gm.backward and back.backward:
                    hcot_iv.append((max(uses), tick[Op(B, bb, last_bb, mb)], mb))
    bnd, bcot = colour(bnd_iv), colour(bcot_iv)
    cond, hcot = colour(cond_iv), colour(hcot_iv)
    need = {"stash": {m: max(stash[(m, r)][1] for r in range(P)) for m in mods},
            "cot": {m: max(cot[(m, r)][1] for r in range(P)) for m in mods},
            "res": {m: max(res[(m, r)][1] for r in range(P)) for m in mods},
            "boundary": max(bnd[1], bcot[1]), "cond": max(cond[1], hcot[1]),
            "ticks": 1 + max(tick.values(), default=-1)}
    return stash, cot, res, bnd[0], bcot[0], cond[0], hcot[0], need


def lower(plan: Plan, buckets: dict | None = None) -> Table:
    """Lower a plan. `buckets` (keys stash/cot/res: {module: n}, boundary, cond, t_max) fixes the
    static sizes; by default each is the next power of two of what the plan needs."""
    validate(plan)
    g = plan.graph
    P = g.P
    tick = ticks_of(plan)
    stash, cot, res, bnd, bcot, cond, hcot, need = _allocate(plan, tick)
    mods = tuple(m.name for m in g.modules)
    b = buckets or {}
    sb = tuple(b.get("stash", {}).get(m, bucket(need["stash"][m])) for m in mods)
    cb = tuple(b.get("cot", {}).get(m, bucket(need["cot"][m])) for m in mods)
    rb = tuple(b.get("res", {}).get(m, residual_bucket(need["res"][m])) for m in mods)
    nb = b.get("boundary", bucket(need["boundary"]))
    nc = b.get("cond", bucket(need["cond"]))
    T = b.get("t_max", bucket(need["ticks"], 8))
    for what, have, want in [*((f"stash slots of {m}", h, need["stash"][m]) for m, h in zip(mods, sb)),
                             *((f"cotangent slots of {m}", h, need["cot"][m]) for m, h in zip(mods, cb)),
                             *((f"residual slots of {m}", h, need["res"][m]) for m, h in zip(mods, rb)),
                             ("boundary slots", nb, need["boundary"]), ("cond slots", nc, need["cond"]),
                             ("ticks", T, need["ticks"])]:
        if have < want:
            raise ValueError(f"table: the plan needs {want} {what}, the bucket holds {have}")
    sig = Signature(P, mods, tuple(m.chunks // P for m in g.modules), tuple(m.unit for m in g.modules),
                    tuple(m.backward for m in g.modules), sb, cb, nb, nc, T, tuple(m.role for m in g.modules), rb)
    cols = sig.recv_columns()
    k_of = {m: i for i, m in enumerate(mods)}
    ops, recv = idle(sig)
    first_gen_b, last_gen_b = {}, {}      # per microbatch: its generator sub-microbatches' first/last backward
    gen = g.generator
    if gen is not None and g.module(gen).backward:
        for mb in range(g.microbatches):
            subs = [Op(B, gen, 0, mb, u) for u in range(g.n_subs(gen, mb))]
            if subs:
                first_gen_b[mb] = min(subs, key=lambda o: tick[o])
                last_gen_b[mb] = max(subs, key=lambda o: tick[o])
    for op, t in tick.items():
        r, k, m = g.rank(op), k_of[op.module], g.module(op.module)
        v = op.chunk // P
        first, last = op.chunk == 0, op.chunk == m.chunks - 1
        s_slot = stash[(op.module, r)][0].get(Op(F, op.module, op.chunk, op.mb, op.sub), sb[k])
        aux = 0
        if m.role == BACKBONE and first:
            aux = bnd.get(op.mb, nb)
        elif m.role == BACKBONE and last and op.kind == B:
            aux = hcot.get(op.mb, nc)
        elif m.role == GENERATOR and first:
            aux = cond[op.mb]
        elif m.role == ENCODER and last and op.kind == B:
            aux = bcot[op.mb]
        f_op = Op(F, op.module, op.chunk, op.mb, op.sub)
        stores = f_op in plan.stored
        r_slot = res[(op.module, r)][0].get(f_op, rb[k])
        if op.kind == F:
            ops[t, r, F_ON:F_AUX + 1] = (1, k, v, op.mb, op.sub, s_slot, aux)
            ops[t, r, F_STORE:F_RES + 1] = (int(stores), r_slot)
            if not last:
                recv[t, (r + 1) % P, cols[f"f:{op.module}"]] = stash[(op.module, (r + 1) % P)][0][
                    Op(F, op.module, op.chunk + 1, op.mb, op.sub)]
            elif m.role == ENCODER:
                recv[t, (r + 1) % P, cols[f"bnd:{op.module}"]] = bnd[op.mb]
                recv[t, (r + 1) % P, cols[f"bnd_sub:{op.module}"]] = op.sub
            elif m.role == BACKBONE and op.mb in cond:
                recv[t, (r + 1) % P, cols["cond"]] = cond[op.mb]
        else:
            c_slot = cot[(op.module, r)][0].get(op, cb[k])
            s_slot = sb[k] if stores else s_slot         # its residuals replace the stashed input
            ops[t, r, B_ON:B_FIRST + 1] = (1, k, v, op.mb, op.sub, s_slot, c_slot, aux,
                                           int(first_gen_b.get(op.mb) == op))
            ops[t, r, B_STORE:B_RES + 1] = (int(stores), r_slot)
            if not first:
                recv[t, (r - 1) % P, cols[f"b:{op.module}"]] = cot[(op.module, (r - 1) % P)][0][
                    Op(B, op.module, op.chunk - 1, op.mb, op.sub)]
            elif m.role == BACKBONE:
                for e in sig.encoders:
                    if op.mb in bcot and g.module(e).backward:
                        recv[t, (r - 1) % P, cols[f"bcot:{e}"]] = bcot[op.mb]
            elif m.role == GENERATOR and last_gen_b.get(op.mb) == op and op.mb in hcot:
                recv[t, (r - 1) % P, cols["hcot"]] = hcot[op.mb]
    return Table(ops, recv, need["ticks"], sig)


def idle(sig: Signature) -> tuple[np.ndarray, np.ndarray]:
    """(ops, recv) of t_max ticks in which nothing runs and every arrival goes to the trash."""
    cols = sig.recv_columns()
    ops = np.zeros((sig.t_max, sig.P, OP_FIELDS), np.int32)
    recv = np.zeros((sig.t_max, sig.P, len(cols)), np.int32)
    for k, m in enumerate(sig.modules):
        recv[:, :, cols[f"f:{m}"]] = sig.stash_slots[k]
        recv[:, :, cols[f"b:{m}"]] = sig.cot_slots[k]
    for e in sig.encoders:
        recv[:, :, cols[f"bnd:{e}"]] = sig.boundary_slots
        recv[:, :, cols[f"bcot:{e}"]] = sig.boundary_slots
    if sig.generator is not None:
        recv[:, :, cols["cond"]] = sig.cond_slots
        recv[:, :, cols["hcot"]] = sig.cond_slots
    return ops, recv


def busy(sig: Signature, module: str, kind: str, v: int = 0, store: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ops, recv) in which every rank runs `kind` of its chunk v of `module` on every tick, on
    trash inputs and into trash outputs: what one op costs inside the tick loop (calibration).
    `store`: the op of the strategy "store" (the signature needs residual slots)."""
    ops, recv = idle(sig)
    k = sig.modules.index(module)
    role = sig.roles[k]
    trash_aux = sig.cond_slots if role == GENERATOR or (role == BACKBONE and kind == B) else sig.boundary_slots
    if store and not sig.residual_slots(module):
        raise ValueError(f"{module} has no residual slots in this signature")
    trash_res = sig.residual_slots(module)
    if kind == F:
        ops[:, :, F_ON:F_AUX + 1] = (1, k, v, 0, 0, sig.stash_slots[k], trash_aux)
        ops[:, :, F_STORE:F_RES + 1] = (int(store), trash_res)
    else:
        if not sig.backward[k]:
            raise ValueError(f"{module} has no backward ops in this signature")
        ops[:, :, B_ON:B_FIRST + 1] = (1, k, v, 0, 0, sig.stash_slots[k], sig.cot_slots[k], trash_aux, 0)
        ops[:, :, B_STORE:B_RES + 1] = (int(store), trash_res)
    return ops, recv
