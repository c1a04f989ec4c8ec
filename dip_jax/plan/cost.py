"""Per-layer FLOPs, bytes and activation memory of each module type, and op latencies.

Latency of a layer = fixed overhead + roofline of its matmuls `max(flops/(a*F), bytes/(a_m*B))`
+ attention FLOPs at their own efficiency + tensor-parallel all-reduces. A pipeline rank is a
TP group of `tp` devices: compute and memory are divided by tp, and each layer all-reduces its
attention and MLP outputs (twice more in backward). Backward = 2x forward; the default memory
strategy "recompute" adds one more forward and keeps only each chunk's input alive, "store"
keeps the chunk's residuals instead (calibrated: the residual bytes the runtime's chunks keep).
"""
from __future__ import annotations

import dataclasses
import functools

from dip_jax import specs
from dip_jax.config import ModelConfig, attention_params, swiglu_params
from dip_jax.plan.hardware import Hardware

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}   # activations and the weights matmuls read, by compute dtype
STATE_BYTES_PER_PARAM = 16         # fp32 weights, grads and Adam moments (the same 16 for bf16 compute)
ACT_BYTES_PER_TOKEN_DIM = 34       # stored activations of one transformer layer in bf16 (flash attention)
STRATEGIES = ("recompute", "store")


@dataclasses.dataclass(frozen=True)
class Work:
    """Forward work of one unit (layer, or the embed/head extras) at a given shape."""
    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    bytes: float = 0.0
    tp_bytes: float = 0.0          # payload all-reduced inside the TP group
    act_bytes: float = 0.0         # activations kept for backward without recompute

    def __add__(self, o: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))


def _block(tokens: int, seq: int, dim: int, attn_dim: int, matmul_params: int, causal: bool,
           nbytes: int, extra_kv_tokens: int = 0) -> Work:
    """`nbytes`: bytes per element in the compute dtype."""
    att = 4.0 * tokens * attn_dim * (seq / 2 if causal else seq)
    att += 4.0 * tokens * attn_dim * extra_kv_tokens
    return Work(matmul_flops=2.0 * tokens * matmul_params, attention_flops=att,
                bytes=nbytes * (matmul_params + 12 * tokens * dim), tp_bytes=2 * nbytes * tokens * dim,
                act_bytes=ACT_BYTES_PER_TOKEN_DIM * nbytes / 2 * tokens * dim)


class CostModel:
    """Op latencies and memory for one model on one hardware profile with TP `tp`."""

    def __init__(self, model: ModelConfig, hw: Hardware, tp: int = 1, seq_len: int = 8192, calibration=None):
        """`calibration`: a `plan.calibrated.Calibration` measured on the running backend; its
        op, tick and step costs replace the roofline's for the modules it covers. `residuals`
        (set by whoever has measured them, as `Calibration.residuals`) override the bytes a
        stored op keeps."""
        self.model, self.hw, self.tp, self.seq_len = model, hw, tp, seq_len
        self.calibration = calibration
        self.residuals: dict | None = None
        self.bytes = DTYPE_BYTES[model.compute_dtype]

    # -- shapes --------------------------------------------------------------------------
    def tokens_per_unit(self, module: str) -> int:
        return specs.get(module).layer_tokens(self.model.module(module), self.seq_len)

    def boundary_bytes(self, module: str, units: int) -> float:
        """Activation sent between consecutive chunks (and kept per chunk under recompute)."""
        width = specs.get(module).carry_width(self.model.module(module))
        return self.bytes * units * self.tokens_per_unit(module) * width

    # -- work ----------------------------------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def layer_work(self, module: str, units: int) -> Work:
        spec, cfg = specs.get(module), self.model.module(module)
        n = self.tokens_per_unit(module)
        attn = attention_params(cfg.dim, cfg.heads, cfg.kv_heads)
        mm = attn + swiglu_params(cfg.dim, cfg.mlp_hidden)
        adim = cfg.heads * cfg.head_dim
        w = _block(n, n, cfg.dim, adim, mm + spec.layer_extra_params(cfg), spec.causal, self.bytes,
                   extra_kv_tokens=spec.cross_tokens(cfg))
        return Work(*(units * x if i != 2 else units * (x - self.bytes * mm) + self.bytes * mm
                      for i, x in enumerate(dataclasses.astuple(w))))

    @functools.lru_cache(maxsize=None)
    def extra_work(self, module: str, units: int, first: bool, last: bool) -> Work:
        """Embedding / patchify work on the first chunk, head / projector / loss on the last."""
        spec, cfg, d = specs.get(module), self.model.module(module), self.model.width
        n = units * self.tokens_per_unit(module)
        w = Work()
        if first:
            p = spec.embed_params(cfg, d)
            w += Work(matmul_flops=2.0 * n * p if spec.embed_is_matmul else 0.0, bytes=self.bytes * (p + 2 * n * cfg.dim))
        if last:
            p = spec.head_params(cfg, d)
            out = spec.head_tokens(cfg, n)
            w += Work(matmul_flops=2.0 * out * p, bytes=self.bytes * (p + 2 * n * cfg.dim))
        return w

    # -- latency -------------------------------------------------------------------------
    def seconds(self, w: Work, rows: int) -> float:
        """`rows`: the GEMM M dimension (tokens in the op); small ones under-use the device."""
        hw, e, tp = self.hw, self.hw.efficiency, self.tp
        occupancy = rows / (rows + hw.matmul_half_tokens)
        peak = hw.peak_flops * tp * occupancy
        t = max(w.matmul_flops / (e["matmul"] * peak), w.bytes / (e["memory"] * hw.hbm_bandwidth * tp))
        t += w.attention_flops / (e["attention"] * peak)
        if tp > 1:
            t += 2 * (tp - 1) / tp * w.tp_bytes / (e["collective"] * hw.tp_link_bandwidth)
        return t

    def op_seconds(self, module: str, kind: str, layers: int, units: int, first: bool = False,
                   last: bool = False, strategy: str = "recompute") -> float:
        """Latency of a forward ("F") or backward ("B") op over `layers` consecutive layers."""
        if units <= 0:
            return 0.0
        cal = self.calibration
        if cal is not None and cal.covers(module):
            t = cal.op_seconds(module, kind, layers, units, last)
            if strategy == "recompute":
                return t
            if module in cal.stored_delta:      # measured in the tick loop against the recompute op
                return max(t + cal.stored_delta[module][kind] * cal.scale, 0.0)
            return t if kind == "F" else max(t - cal.op_seconds(module, "F", layers, units, last), 0.0)
        rows = units * self.tokens_per_unit(module)
        fwd = self.seconds(self.layer_work(module, units), rows) * layers + \
            self.seconds(self.extra_work(module, units, first, last), rows)
        fwd += self.hw.op_overhead * max(1, layers)
        if kind == "F":
            return fwd
        return 2.0 * fwd + (fwd if strategy == "recompute" else 0.0)

    def tick_seconds(self, strategy: str = "recompute") -> float:
        """What a lock-step tick costs beyond its busiest rank's ops (its sends); "store": in a
        program with residual slots (measured, when calibrated)."""
        if self.calibration is not None:
            return self.calibration.tick(strategy)
        return self.p2p_seconds(specs.with_role(self.model, specs.BACKBONE), 1)

    def step_seconds(self) -> float:
        """What a step costs beyond its ticks (measured only: 0 without a calibration)."""
        return self.calibration.step() if self.calibration is not None else 0.0

    def padded_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Layers each chunk op computes: a calibrated model describes this runtime, whose
        chunk stacks all have the depth of the deepest chunk (padding is masked, not skipped)."""
        return tuple(max(layers) for _ in layers) if self.calibration is not None else tuple(layers)

    def p2p_seconds(self, module: str, units: int) -> float:
        e = self.hw.efficiency["p2p"]
        return self.hw.p2p_latency + self.boundary_bytes(module, units) / self.tp / (e * self.hw.p2p_bandwidth)

    # -- memory --------------------------------------------------------------------------
    def stored_bytes(self, module: str, layers: int, units: int, strategy: str = "recompute") -> float:
        """Bytes one forward op leaves alive until its backward: its chunk's input under
        "recompute", the residuals of its chunk under "store" (measured, when calibrated)."""
        if strategy == "recompute":
            return self.boundary_bytes(module, units) / self.tp
        if self.residuals and module in self.residuals:
            from dip_jax.plan.calibrated import interpolate
            f = self.residuals[module]
            return interpolate(f["units"], f["a"], units) + interpolate(f["units"], f["b"], units) * layers
        cal = self.calibration
        if cal is not None and cal.covers_residuals(module):
            return cal.residual_bytes(module, layers, units)          # measured per device
        return layers * self.layer_work(module, units).act_bytes / self.tp

    def working_bytes(self, module: str, layers: int, units: int, strategy: str = "recompute") -> float:
        """Transient peak while a backward op recomputes its chunk (the recomputed activations);
        a backward that applies stored residuals recomputes nothing."""
        if strategy != "recompute":
            return 0.0
        return self.stored_bytes(module, layers, units, "store")

    def param_bytes(self, params: float) -> float:
        return STATE_BYTES_PER_PARAM * params / self.tp

    def efficiency(self, module: str, units: int) -> float:
        """Achieved fraction of peak FLOP/s of one layer at this sub-microbatch size."""
        w = self.layer_work(module, units)
        t = self.seconds(w, units * self.tokens_per_unit(module)) + self.hw.op_overhead
        return (w.matmul_flops + w.attention_flops) / (t * self.hw.peak_flops * self.tp)
