"""Attention backends behind one call: `attention(q, k, v, backend=..., segment ids, causal)`.

q [B, S, H, d], k/v [B, T, KV, d] with H % KV == 0 (grouped-query attention, native in every
backend). What a query may see is structural: query i sees key j iff
`q_segment_ids[i] == kv_segment_ids[j]` and, when `causal`, `j <= i` (top-left aligned, as
`jnp.tril` of an S x T matrix). Segment id 0 has no special meaning: the llm's padding tokens
attend among themselves, as they always have. A dense bool `mask` [B|1, H|1, S, T] is accepted
by the xla backend only (the others never materialise S x T).

Backends (`model.attention`):
- xla: `jax.nn.dot_product_attention` over the dense mask (materialises the S x T scores).
- blockwise: online softmax over blocks of queries and keys in plain JAX, with a custom VJP
  whose residuals are O(S) (the output and one logsumexp per row); runs everywhere.
- cudnn: cuDNN flash attention (GPU, bf16/fp16).
- splash: Pallas splash attention (TPU).
- auto: see `choose`.

Rows whose every key is masked give 0 output and 0 gradients in every backend. (XLA alone
would average such a row uniformly over its masked keys; fused kernels leave it undefined.)
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dip_jax.config.checks import require
from dip_jax.config.model import ATTENTIONS

KEY = "model.attention"
BLOCK = 512                 # blockwise tile (queries and keys); shorter sequences are one tile
LONG = 1024 * 1024          # auto: S * T from which the S x T scores are not worth materialising
_NEG = -0.7 * float(np.finfo(np.float32).max)   # what jax.nn uses for masked logits (finite: no inf - inf)
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_logged: set = set()


# -- choosing a backend ---------------------------------------------------------------------

def _platform() -> str:
    return jax.default_backend()


def check(name: str, compute_dtype, platform: str | None = None) -> None:
    """Fail at model build (before anything compiles) when `name` cannot run here."""
    require(name in ATTENTIONS, KEY, f"unknown attention backend {name!r}; choose one of {ATTENTIONS}")
    platform = platform or _platform()
    dtype = jnp.dtype(compute_dtype)
    if name == "cudnn":
        require(platform == "gpu", KEY, f"cudnn needs a GPU, and jax's backend is {platform}; "
                "choose auto, xla or blockwise")
        require(dtype in _HALF, KEY, f"cudnn runs in bfloat16/float16, and model.compute_dtype is {dtype.name}; "
                "set model.compute_dtype=bfloat16 or choose blockwise")
    if name == "splash":
        require(platform == "tpu", KEY, f"splash is a TPU kernel, and jax's backend is {platform}; "
                "choose auto, xla or blockwise")
        require(_splash_module() is not None, KEY, f"this jax ({jax.__version__}) has no "
                "jax.experimental.pallas.ops.tpu.splash_attention; choose blockwise")


def choose(name: str, dtype, seq: int, keys: int, head_dim: int, dense_mask: bool = False,
           platform: str | None = None) -> str:
    """The backend `name` resolves to for these shapes.

    auto: a dense mask -> xla (only xla reads one); GPU with bf16/fp16 and a head dim cuDNN
    takes (a multiple of 8, at most 128) -> cudnn; TPU -> splash; otherwise blockwise once
    S * T reaches 1024 x 1024 (there the S x T float32 scores of every head dominate the
    activations), xla below (one fused op beats a loop over a handful of tiles).
    """
    if name != "auto":
        return name
    platform = platform or _platform()
    if dense_mask:
        return "xla"
    if platform == "gpu" and jnp.dtype(dtype) in _HALF and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if platform == "tpu" and _splash_module() is not None:
        return "splash"
    return "blockwise" if seq * keys >= LONG else "xla"


def _log_once(choice: str, platform: str, dtype, seq: int, keys: int) -> None:
    line = f"dip_jax: model.attention=auto -> {choice} ({platform}, {jnp.dtype(dtype).name}, {seq} x {keys})"
    if line not in _logged:
        _logged.add(line)
        print(line, flush=True)


def attention(q, k, v, *, backend: str = "xla", q_segment_ids=None, kv_segment_ids=None, causal: bool = False,
              mask=None):
    """Softmax(q k^T / sqrt(d)) v under the structural mask; see the module docstring.

    Segment ids: int [B, S] and [B, T], both or neither (neither: one segment; self-attention
    may give only q's). Softmax in float32 whatever the inputs' dtype; the output has v's dtype.
    """
    B, S, H, d = q.shape
    T = k.shape[1]
    if q_segment_ids is not None and kv_segment_ids is None and S == T:
        kv_segment_ids = q_segment_ids          # self-attention
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: give both q_segment_ids and kv_segment_ids (or neither)")
    if q_segment_ids is not None:
        q_segment_ids = _segments(q_segment_ids, B, S)
        kv_segment_ids = _segments(kv_segment_ids, B, T)
    name = choose(backend, q.dtype, S, T, d, mask is not None)
    if backend == "auto":
        _log_once(name, _platform(), q.dtype, S, T)
    if name == "xla":
        return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal, mask)
    require(mask is None, KEY, f"{name} takes segment ids and the causal flag, not a dense mask; "
            "pass segment ids, or choose xla")
    if name == "blockwise":
        return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
    check(name, q.dtype)
    if name == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)
    return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal)


def _segments(ids, b: int, n: int):
    return jnp.broadcast_to(jnp.asarray(ids).astype(jnp.int32), (b, n))


def dense_mask(q_segment_ids, kv_segment_ids, causal: bool, s: int, t: int):
    """bool [B|1, 1, S, T]: the structural mask written out (what the xla backend reads)."""
    if q_segment_ids is None:
        same = jnp.ones((1, s, t), bool)
    else:
        same = q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
    if causal:
        same = same & jnp.tril(jnp.ones((s, t), bool))
    return same[..., None, :, :]


def rows_with_keys(q_segment_ids, kv_segment_ids, causal: bool, s: int, t: int):
    """bool [B|1, S]: whether query i sees at least one key, in O((S + T) log T).

    The first key of each segment (stable sort, then a binary search) decides: one exists, and
    under `causal` it is at or before the query."""
    if q_segment_ids is None:
        return jnp.ones((1, s), bool) if (not causal or t > 0) else jnp.zeros((1, s), bool)

    def one(qs, ks):
        order = jnp.argsort(ks, stable=True)
        sorted_ks = ks[order]
        at = jnp.clip(jnp.searchsorted(sorted_ks, qs, side="left"), 0, t - 1)
        found = sorted_ks[at] == qs
        if causal:
            found = found & (order[at] <= jnp.arange(s))
        return found

    return jax.vmap(one)(q_segment_ids, kv_segment_ids)


def _zero_empty_rows(out, rows):
    """out [B, S, H, d], rows bool [B|1, S] (or [B|1, H|1, S])."""
    if rows.ndim == 3:
        rows = jnp.swapaxes(rows, 1, 2)          # [B, S, H]
    else:
        rows = rows[:, :, None]
    return jnp.where(rows[..., None], out, jnp.zeros((), out.dtype))


# -- xla --------------------------------------------------------------------------------------

def xla_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal: bool = False, mask=None):
    """`jax.nn.dot_product_attention` over the dense mask; the structural mask is written out
    exactly as the models' attention_mask always wrote it, so the numbers are the same."""
    S, T = q.shape[1], k.shape[1]
    if q_segment_ids is not None or causal:
        structural = dense_mask(q_segment_ids, kv_segment_ids, causal, S, T)
        mask = structural if mask is None else mask & structural
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return out if mask is None else _zero_empty_rows(out, jnp.any(mask, axis=-1))


# -- blockwise --------------------------------------------------------------------------------

def blockwise_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal: bool = False,
                        block_q: int | None = None, block_k: int | None = None):
    """Flash-style attention in plain JAX: O(S) residuals, scores recomputed tile by tile in the
    backward. Static-length scans only (no while loop with a data-dependent trip count, no
    cond); under `causal` the tiles above the diagonal are never visited."""
    B, S, H, d = q.shape
    T = k.shape[1]
    if q_segment_ids is None:
        q_segment_ids, kv_segment_ids = jnp.zeros((B, S), jnp.int32), jnp.zeros((B, T), jnp.int32)
    bq, bk = min(block_q or BLOCK, S), min(block_k or BLOCK, T)
    return _blockwise(q, k, v, q_segment_ids, kv_segment_ids, causal, bq, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, qs, ks, causal, bq, bk):
    return _blockwise_fwd(q, k, v, qs, ks, causal, bq, bk)[0]


def _tiles(S, T, bq, bk, causal):
    """The (query tile, key tile) pairs that hold at least one visible entry."""
    nq, nk = -(-S // bq), -(-T // bk)
    pairs = [(i, j) for i in range(nq) for j in range(nk) if not causal or j * bk <= (i + 1) * bq - 1]
    return nq, nk, jnp.asarray(np.array(pairs, np.int32).reshape(-1, 2))


def _blocked(x, n, b, axis=1):
    """Pad axis 1 (the sequence) to n * b and move its tiles to the front: [n, B, b, ...]."""
    pad = n * b - x.shape[axis]
    if pad:
        x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    x = x.reshape(x.shape[0], n, b, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblocked(x, n_real):
    """[n, B, b, ...] -> [B, n * b, ...] cut to n_real."""
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape(x.shape[0], -1, *x.shape[3:])
    return x[:, :n_real]


class _Tiling:
    """The inputs cut into tiles, and what a (query tile i, key tile j) step reads."""

    def __init__(self, q, k, v, qs, ks, causal, bq, bk):
        B, S, H, d = q.shape
        T, KV = k.shape[1], k.shape[2]
        self.S, self.T, self.H, self.KV, self.G, self.d = S, T, H, KV, H // KV, d
        self.causal, self.bq, self.bk = causal, bq, bk
        self.scale = 1.0 / math.sqrt(d)
        self.nq, self.nk, self.pairs = _tiles(S, T, bq, bk, causal)
        self.q = _blocked(q.reshape(B, S, KV, self.G, d), self.nq, bq)        # [nq, B, bq, KV, G, d]
        self.k, self.v = _blocked(k, self.nk, bk), _blocked(v, self.nk, bk)   # [nk, B, bk, KV, d]
        self.qs, self.ks = _blocked(qs, self.nq, bq), _blocked(ks, self.nk, bk)  # [n, B, b]

    def mask(self, i, j):
        """bool [B, 1, 1, bq, bk]: same segment, a real key (not tile padding), causal."""
        qi = i * self.bq + jnp.arange(self.bq)
        kj = j * self.bk + jnp.arange(self.bk)
        m = self.qs[i][:, :, None] == self.ks[j][:, None, :]
        m = m & (kj < self.T)[None, None, :]
        if self.causal:
            m = m & (kj[None, :] <= qi[:, None])[None]
        return m[:, None, None]

    def scores(self, i, j):
        """float32 [B, KV, G, bq, bk], masked entries at a large finite negative."""
        s = jnp.einsum("bqkgd,btkd->bkgqt", self.q[i], self.k[j], preferred_element_type=jnp.float32)
        m = self.mask(i, j)
        return jnp.where(m, s * jnp.float32(self.scale), _NEG), m


def _blockwise_fwd(q, k, v, qs, ks, causal, bq, bk):
    t = _Tiling(q, k, v, qs, ks, causal, bq, bk)
    B = q.shape[0]
    row = (t.nq, B, t.KV, t.G, bq)
    init = (jnp.full(row, _NEG, jnp.float32), jnp.zeros(row, jnp.float32),
            jnp.zeros((t.nq, B, bq, t.KV, t.G, t.d), jnp.float32))

    def step(carry, ij):
        m_all, l_all, acc_all = carry
        i, j = ij[0], ij[1]
        s, mask = t.scores(i, j)
        m_old = m_all[i]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
        # where, not only the large negative: a row with no visible key so far must sum to 0
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_old - m_new)
        pv = jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), t.v[j], preferred_element_type=jnp.float32)
        acc = acc_all[i] * jnp.moveaxis(alpha, -1, 1)[..., None] + pv
        return (m_all.at[i].set(m_new), l_all.at[i].set(alpha * l_all[i] + jnp.sum(p, axis=-1)),
                acc_all.at[i].set(acc)), None

    (m, l, acc), _ = lax.scan(step, init, t.pairs)
    seen = l > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    out = acc * jnp.moveaxis(inv, -1, 2)[..., None]                    # rows with no key: 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)   # [nq, B, KV, G, bq]
    out = _unblocked(out, t.S).reshape(q.shape).astype(v.dtype)
    return out, (q, k, v, qs, ks, out, lse)


def _blockwise_bwd(causal, bq, bk, res, g):
    q, k, v, qs, ks, out, lse = res
    t = _Tiling(q, k, v, qs, ks, causal, bq, bk)
    B = q.shape[0]
    grouped = lambda x: _blocked(x.reshape(B, t.S, t.KV, t.G, t.d), t.nq, bq)
    do = grouped(g.astype(v.dtype))                                                  # [nq, B, bq, KV, G, d]
    delta = jnp.sum(do.astype(jnp.float32) * grouped(out).astype(jnp.float32), axis=-1)  # [nq, B, bq, KV, G]
    delta = jnp.moveaxis(delta, 2, -1)                                                # [nq, B, KV, G, bq]
    init = (jnp.zeros(t.q.shape, jnp.float32), jnp.zeros(t.k.shape, jnp.float32), jnp.zeros(t.v.shape, jnp.float32))

    def step(carry, ij):
        dq, dk, dv = carry
        i, j = ij[0], ij[1]
        s, mask = t.scores(i, j)
        p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)                      # [B, KV, G, bq, bk]
        dv_j = jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do.dtype), do[i], preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,btkd->bkgqt", do[i], t.v[j], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[i][..., None]) * jnp.float32(t.scale)
        dq_i = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(k.dtype), t.k[j], preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(q.dtype), t.q[i], preferred_element_type=jnp.float32)
        return (dq.at[i].add(dq_i), dk.at[j].add(dk_j), dv.at[j].add(dv_j)), None

    (dq, dk, dv), _ = lax.scan(step, init, t.pairs)
    dq = _unblocked(dq, t.S).reshape(q.shape).astype(q.dtype)
    dk, dv = _unblocked(dk, t.T).astype(k.dtype), _unblocked(dv, t.T).astype(v.dtype)
    return dq, dk, dv, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# -- cudnn ------------------------------------------------------------------------------------

def cudnn_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal: bool = False):
    """cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`.

    Causality is cuDNN's own (masked tiles skipped) when S == T. jax's public API takes no
    segment ids in jax 0.10-0.12, so packed segments go in as a bool mask [B, 1, S, T], which
    jax turns into an additive bias: S x T per sequence (not per head), read by the fused
    kernel. (The packed THD layout of the lower-level API is avoided: with grouped-query
    attention it read the wrong keys before jax PR #39521.)"""
    S, T = q.shape[1], k.shape[1]
    own_causal = causal and S == T
    mask = None
    if q_segment_ids is not None or (causal and not own_causal):
        mask = dense_mask(q_segment_ids, kv_segment_ids, causal and not own_causal, S, T)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=own_causal, implementation="cudnn")
    if q_segment_ids is None:
        return out
    return _zero_empty_rows(out, rows_with_keys(q_segment_ids, kv_segment_ids, causal, S, T))


# -- splash -----------------------------------------------------------------------------------

def _splash_module():
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention
    except ImportError:     # moved or dropped in a later jax
        return None
    return splash_attention


_SPLASH_TILE = 128          # the TPU kernel's sequence tiles are multiples of 128


@functools.lru_cache(maxsize=64)
def _splash_kernel(S: int, T: int, heads: int, causal: bool, interpret: bool):
    sa = _splash_module()
    bq, bk = (max(b for b in (512, 256, 128) if n % b == 0) for n in (S, T))
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    one = sa.CausalMask((S, T)) if causal else sa.FullMask((S, T))
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * heads), block_sizes=sizes,
                                            interpret=interpret)


def splash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, causal: bool = False,
                     interpret: bool = False):
    """Pallas TPU splash attention with SegmentIds; one multi-query kernel per kv head (its G
    query heads), over the batch. Sequences are padded to the kernel's 128-multiple tiles with
    a segment id no real token has. `interpret` runs the kernel on any backend (tests)."""
    B, S, H, d = q.shape
    T, KV = k.shape[1], k.shape[2]
    G = H // KV
    Sp, Tp = (-(-n // _SPLASH_TILE) * _SPLASH_TILE for n in (S, T))
    if q_segment_ids is None:
        q_segment_ids, kv_segment_ids = jnp.zeros((B, S), jnp.int32), jnp.zeros((B, T), jnp.int32)
    pad_id = jnp.iinfo(jnp.int32).min
    qs = jnp.pad(q_segment_ids, ((0, 0), (0, Sp - S)), constant_values=pad_id)
    ks = jnp.pad(kv_segment_ids, ((0, 0), (0, Tp - T)), constant_values=pad_id)
    # the kernel takes the logits unscaled: fold 1/sqrt(d) into q
    qh = jnp.pad(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    qh = qh.reshape(B, Sp, KV, G, d).transpose(0, 2, 3, 1, 4)                # [B, KV, G, Sp, d]
    kh = jnp.pad(k, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)   # [B, KV, Tp, d]
    vh = jnp.pad(v, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(Sp, Tp, G, causal, interpret)
    sa = _splash_module()

    def per_sequence(qb, kb, vb, qsb, ksb):
        ids = sa.SegmentIds(q=qsb, kv=ksb)
        return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(qb, kb, vb)

    out = jax.vmap(per_sequence)(qh, kh, vh, qs, ks)                        # [B, KV, G, Sp, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, Sp, H, d)[:, :S].astype(v.dtype)
    return _zero_empty_rows(out, rows_with_keys(q_segment_ids, kv_segment_ids, causal, S, T))
