"""Typed, frozen configuration. Defaults live here and only here.

A config file in ``configs/`` is a Python module whose ``get_config()`` returns a
``TrainConfig`` built from these dataclasses with the deltas it needs. This module is
pure Python (no jax), so the planner can read configs and the analytic parameter counts.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Optional

BASELINES = ("gpipe", "1f1b", "interleaved_1f1b", "encoders_first")   # static schedules DIP is compared with
SCHEDULERS = ("dip", *BASELINES)                     # what the executor runs
SCHEDULES = (*SCHEDULERS, "none")                    # pipeline.schedule: a scheduler or the unpipelined step
MEMORY_STRATEGIES = ("auto", "recompute", "store")   # pipeline.memory_strategy (dip_jax.plan.memory)
MODULES = ("vision", "audio", "llm", "dit")
OVERSIZE = ("truncate", "skip", "error")
ON_NONFINITE = ("stop", "skip")

# While a list of overrides is applied, intermediate configs may be inconsistent (e.g. mesh.pipe
# raised before the layer counts that must follow it); the checks then run once, at the end.
_DEFER_CHECKS = contextvars.ContextVar("dip_jax_defer_checks", default=False)


@contextlib.contextmanager
def deferred_checks():
    token = _DEFER_CHECKS.set(True)
    try:
        yield
    finally:
        _DEFER_CHECKS.reset(token)


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _positive(obj, prefix: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _require(v > 0, f"{prefix}.{n}", f"must be > 0, got {v!r}")


# ---------------------------------------------------------------------------------------------
# Analytic parameter counts. They mirror the Flax modules in dip_jax/models exactly (a test
# checks them against nnx.eval_shape) and are what the planner's cost model uses.


def attention_params(dim: int, heads: int, kv_heads: int, kv_dim: Optional[int] = None) -> int:
    head_dim = dim // heads
    kv_dim = dim if kv_dim is None else kv_dim
    return dim * heads * head_dim + 2 * kv_dim * kv_heads * head_dim + heads * head_dim * dim


def swiglu_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def projector_params(d_in: int, d_out: int) -> int:
    """Two-layer GELU MLP with biases (encoder -> llm width)."""
    return d_in * d_out + d_out + d_out * d_out + d_out


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    layers: int = 2
    dim: int = 64
    mlp_hidden: int = 128
    heads: int = 4
    kv_heads: int = 4

    def _check(self, prefix: str) -> None:
        _positive(self, prefix, "layers", "dim", "mlp_hidden", "heads", "kv_heads")
        _require(self.dim % self.heads == 0, f"{prefix}.dim", f"{self.dim} not divisible by heads={self.heads}")
        _require(self.heads % self.kv_heads == 0, f"{prefix}.kv_heads",
                 f"heads={self.heads} not divisible by kv_heads={self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def block_params(self) -> int:
        """Pre-norm transformer block: 2 RMSNorm + attention + SwiGLU."""
        return 2 * self.dim + attention_params(self.dim, self.heads, self.kv_heads) + swiglu_params(
            self.dim, self.mlp_hidden)


@dataclasses.dataclass(frozen=True)
class VisionConfig(BlockConfig):
    image_size: int = 16
    patch_size: int = 4
    channels: int = 3
    spatial_merge: int = 2

    def check(self, prefix: str = "model.vision") -> None:
        self._check(prefix)
        _positive(self, prefix, "image_size", "patch_size", "channels", "spatial_merge")
        _require(self.image_size % self.patch_size == 0, f"{prefix}.patch_size",
                 f"image_size={self.image_size} not divisible by patch_size={self.patch_size}")
        _require(self.patches_per_side % self.spatial_merge == 0, f"{prefix}.spatial_merge",
                 f"{self.patches_per_side} patches per side not divisible by {self.spatial_merge}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def tokens_per_image(self) -> int:
        return self.patches // self.spatial_merge ** 2

    def embed_params(self) -> int:
        return self.patch_size ** 2 * self.channels * self.dim + self.dim + self.patches * self.dim

    def head_params(self, out_dim: int) -> int:
        return self.dim + projector_params(self.spatial_merge ** 2 * self.dim, out_dim)

    def param_count(self, out_dim: int) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.head_params(out_dim)


@dataclasses.dataclass(frozen=True)
class AudioConfig(BlockConfig):
    mel_bins: int = 16
    frames_per_second: int = 32
    clip_seconds: float = 1.0
    conv_kernel: int = 3

    def check(self, prefix: str = "model.audio") -> None:
        self._check(prefix)
        _positive(self, prefix, "mel_bins", "frames_per_second", "clip_seconds", "conv_kernel")
        _require(self.frames_per_clip % 4 == 0, f"{prefix}.frames_per_second",
                 f"frames per clip ({self.frames_per_clip}) must be divisible by the 4x conv subsampling")

    @property
    def frames_per_clip(self) -> int:
        return int(round(self.frames_per_second * self.clip_seconds))

    @property
    def tokens_per_clip(self) -> int:
        return self.frames_per_clip // 4

    def embed_params(self) -> int:
        k = self.conv_kernel
        return (k * self.mel_bins * self.dim + self.dim) + (k * self.dim * self.dim + self.dim) + \
            self.tokens_per_clip * self.dim

    def head_params(self, out_dim: int) -> int:
        return self.dim + projector_params(self.dim, out_dim)

    def param_count(self, out_dim: int) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.head_params(out_dim)


@dataclasses.dataclass(frozen=True)
class LLMConfig(BlockConfig):
    vocab_size: int = 256
    rope_theta: float = 10000.0

    def check(self, prefix: str = "model.llm") -> None:
        self._check(prefix)
        _positive(self, prefix, "vocab_size", "rope_theta")
        _require(self.head_dim % 2 == 0, f"{prefix}.heads", f"head_dim={self.head_dim} must be even for RoPE")

    def embed_params(self) -> int:
        return self.vocab_size * self.dim

    def head_params(self) -> int:
        return self.dim + self.dim * self.vocab_size

    def param_count(self) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.head_params()


@dataclasses.dataclass(frozen=True)
class DiTConfig(BlockConfig):
    latent_channels: int = 8
    latent_frames_per_second: int = 4
    tokens_per_frame: int = 4
    clip_seconds: float = 1.0
    cond_tokens: int = 16
    time_embed_dim: int = 64

    def check(self, prefix: str = "model.dit") -> None:
        self._check(prefix)
        _positive(self, prefix, "latent_channels", "latent_frames_per_second", "tokens_per_frame",
                  "clip_seconds", "cond_tokens", "time_embed_dim")
        _require(self.time_embed_dim % 2 == 0, f"{prefix}.time_embed_dim", "must be even")

    @property
    def tokens_per_clip(self) -> int:
        return int(round(self.latent_frames_per_second * self.clip_seconds)) * self.tokens_per_frame

    def block_params(self) -> int:
        """adaLN-modulated block: self-attention, cross-attention to the llm condition, SwiGLU."""
        d = self.dim
        return (d * 6 * d + 6 * d) + d + 2 * attention_params(d, self.heads, self.kv_heads) + \
            swiglu_params(d, self.mlp_hidden)

    def embed_params(self, cond_dim: int) -> int:
        d = self.dim
        return (self.latent_channels * d + d) + self.tokens_per_clip * d + \
            (self.time_embed_dim * d + d + d * d + d) + (cond_dim * d + d)

    def head_params(self) -> int:
        d = self.dim
        return (d * 2 * d + 2 * d) + (d * self.latent_channels + self.latent_channels)

    def param_count(self, cond_dim: int) -> int:
        return self.embed_params(cond_dim) + self.layers * self.block_params() + self.head_params()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    vision: Optional[VisionConfig] = VisionConfig()
    audio: Optional[AudioConfig] = AudioConfig()
    llm: LLMConfig = LLMConfig()
    dit: Optional[DiTConfig] = None
    dit_loss_weight: float = 1.0
    # what matmuls and the activations between pipeline stages run in; parameters, optimizer
    # state, softmax and losses stay float32 either way
    compute_dtype: str = "float32"
    # configs of module types registered with dip_jax.specs.register: ((name, config), ...)
    extra_modules: tuple = ()

    def check(self) -> None:
        from dip_jax import specs
        for name in MODULES:
            sub = getattr(self, name)
            if sub is not None:
                sub.check(f"model.{name}")
        _require(self.llm is not None, "model.llm", "the llm backbone is required")
        seen = set()
        for entry in self.extra_modules:
            _require(isinstance(entry, tuple) and len(entry) == 2, "model.extra_modules",
                     f"entries are (name, config) pairs, got {entry!r}")
            name, sub = entry
            _require(name not in MODULES and name not in seen, "model.extra_modules", f"module {name!r} given twice")
            seen.add(name)
            _require(name in specs.registered(), "model.extra_modules",
                     f"no module spec {name!r} is registered (dip_jax.specs.register)")
            _require(specs.get(name).role == specs.ENCODER, f"model.extra_modules.{name}",
                     "only encoders can be added (the model has one backbone and at most one generator)")
            if hasattr(sub, "check"):
                sub.check(f"model.extra_modules.{name}")
        _require(self.dit_loss_weight >= 0, "model.dit_loss_weight", "must be >= 0")
        _require(self.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype",
                 f"unknown dtype {self.compute_dtype!r}; choose float32 or bfloat16")

    @property
    def modules(self) -> tuple[str, ...]:
        """Present modules in graph order: encoders (built-in, then extra) -> llm -> dit."""
        from dip_jax import specs
        names = [m for m in MODULES if getattr(self, m) is not None] + [n for n, _ in self.extra_modules]
        return specs.graph_order(names)

    def module(self, name: str):
        """The config of module `name` (built-in field or extra module)."""
        if name in MODULES:
            return getattr(self, name)
        for n, sub in self.extra_modules:
            if n == name:
                return sub
        raise KeyError(f"model has no module {name!r}")

    def with_modules(self, subs: dict) -> "ModelConfig":
        """A copy with the configs of the modules in `subs` replaced."""
        extra = tuple((n, subs.get(n, c)) for n, c in self.extra_modules)
        return dataclasses.replace(self, extra_modules=extra, **{k: v for k, v in subs.items() if k in MODULES})

    @property
    def width(self) -> int:
        """The backbone's hidden width: what encoders project into, what the generator reads."""
        return self.llm.dim

    def module_param_count(self, name: str) -> int:
        from dip_jax import specs
        return specs.get(name).param_count(self.module(name), self.width)

    def param_count(self) -> int:
        return sum(self.module_param_count(m) for m in self.modules)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    pipe: int = 1
    tensor: int = 1   # devices per pipeline rank: each chunk's layers are split over them (Megatron-style)

    def check(self) -> None:
        _positive(self, "mesh", "data", "pipe", "tensor")

    @property
    def devices(self) -> int:
        return self.data * self.pipe * self.tensor


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    schedule: str = "none"
    hardware: str = "cpu"              # cost profile: a shipped name, a .json file, or "auto" (calibrate at start)
    memory_cap_gb: float = 80.0
    memory_strategy: str = "recompute"  # per op: auto (store what the cap allows) | recompute | store
    search_rollouts: int = 8           # DIP search budget per batch (deterministic)
    step_cache_size: int = 8           # compiled pipeline programs kept (LRU)
    compile_cache_dir: str = ""        # persistent XLA compilation cache shared across runs ("" = off)
    plan_workers: int = 1              # background planner processes (0 = plan inline, in the step loop)
    plan_ahead: int = 2                # batches planned ahead of the one running
    plan_deadline_seconds: float = 10.0  # longest wait for a plan before the interleaved-1F1B fallback
    plan_faults: tuple = ()            # ((step, "raise" | "late"), ...): make the planner fail, to test fallback

    def check(self) -> None:
        _positive(self, "pipeline", "search_rollouts", "step_cache_size", "plan_ahead", "plan_deadline_seconds")
        _require(self.plan_workers >= 0, "pipeline.plan_workers", f"must be >= 0, got {self.plan_workers!r}")
        for fault in self.plan_faults:
            _require(isinstance(fault, tuple) and len(fault) == 2 and isinstance(fault[0], int)
                     and fault[1] in ("raise", "late"), "pipeline.plan_faults",
                     f"entries are (step, 'raise' | 'late'), got {fault!r}")
        _require(self.schedule in SCHEDULES, "pipeline.schedule",
                 f"unknown scheduler {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        _require(self.memory_cap_gb > 0, "pipeline.memory_cap_gb", "must be > 0")
        _require(self.memory_strategy in MEMORY_STRATEGIES, "pipeline.memory_strategy",
                 f"unknown memory strategy {self.memory_strategy!r}; choose one of {', '.join(MEMORY_STRATEGIES)}")
        from dip_jax.plan.hardware import available
        _require(self.hardware == "auto" or self.hardware.endswith(".json") or self.hardware in available(),
                 "pipeline.hardware", f"{self.hardware!r} is neither 'auto', a .json profile nor one of "
                 f"{', '.join(available())}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "synthetic"            # synthetic | digits
    seq_len: int = 128
    microbatches: int = 8              # packed microbatches per global batch (all replicas)
    max_images: int = 8                # image slots per microbatch
    max_audio_clips: int = 4           # audio clip slots per microbatch
    max_video_clips: int = 4           # video clip slots per microbatch
    seed: int = 0
    prefetch: int = 2
    # synthetic mixture (weights need not sum to 1) and its shape parameters
    mix_caption: float = 0.4
    mix_interleaved: float = 0.3
    mix_audio: float = 0.15
    mix_video: float = 0.15
    caption_tokens_per_image: float = 16.0
    interleaved_tokens_per_image_median: float = 24.0
    interleaved_tokens_per_image_sigma: float = 1.2
    interleaved_max_images: int = 6
    video_seconds_max: float = 16.0
    audio_seconds_max: float = 4.0
    # digits task
    digits_max_images: int = 8
    eval_samples: int = 512
    # a sample that cannot fit one microbatch even alone: cut to fit (as LLaVA and Megatron cut
    # to the maximum sequence length), drop it, or stop with an error naming it
    oversize: str = "truncate"

    def check(self) -> None:
        _require(self.task in ("synthetic", "digits"), "data.task",
                 f"unknown task {self.task!r}; choose synthetic or digits")
        _require(self.oversize in OVERSIZE, "data.oversize",
                 f"unknown policy {self.oversize!r}; choose one of {', '.join(OVERSIZE)}")
        _positive(self, "data", "seq_len", "microbatches", "prefetch", "eval_samples")
        for n in ("max_images", "max_audio_clips", "max_video_clips", "digits_max_images"):
            _require(getattr(self, n) >= 0, f"data.{n}", "must be >= 0")
        for n in ("mix_caption", "mix_interleaved", "mix_audio", "mix_video"):
            _require(getattr(self, n) >= 0, f"data.{n}", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    warmup_steps: int = 10
    schedule: str = "cosine"           # cosine | constant
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    # (module, multiplier) pairs, e.g. (("vision", 0.5),); a module listed in `frozen` gets none
    lr_multipliers: tuple = ()
    frozen: tuple = ()
    # ZeRO-1: a pipelined run's Adam moments split over the data replicas (each replica updates
    # its share; the update gathers what it needs); has an effect only when mesh.data > 1
    shard_state_over_data: bool = True

    def check(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.schedule in ("cosine", "constant"), "optim.schedule", "choose cosine or constant")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
        for item in self.lr_multipliers:
            _require(isinstance(item, tuple) and len(item) == 2 and item[0] in MODULES
                     and isinstance(item[1], (int, float)), "optim.lr_multipliers",
                     f"entries are (module, multiplier) with module in {MODULES}; got {item!r}")
        for m in self.frozen:
            _require(m in MODULES, "optim.frozen", f"unknown module {m!r}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0                # 0 = only at the end (if the task has an eval)
    progress: bool = True
    timeline_every: int = 100          # write DIR/timelines/step_N.* every this many steps (0 = never) ...
    timeline_first: int = 2            # ... and for the first steps of a run
    # a step whose loss or gradient norm is not finite never updates the state; "stop" ends the
    # run (exit code 1) after `max_nonfinite_steps` such steps in a row, "skip" keeps going
    on_nonfinite: str = "stop"
    max_nonfinite_steps: int = 3

    def check(self) -> None:
        _positive(self, "train", "steps", "log_every", "max_nonfinite_steps")
        for name in ("eval_every", "timeline_every", "timeline_first"):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        _require(self.on_nonfinite in ON_NONFINITE, "train.on_nonfinite",
                 f"unknown policy {self.on_nonfinite!r}; choose one of {', '.join(ON_NONFINITE)}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 20                    # a preempted run loses at most this many steps
    keep: int = 2

    def check(self) -> None:
        _positive(self, "checkpoint", "every", "keep")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    pipeline: PipelineConfig = PipelineConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self):
        if not _DEFER_CHECKS.get():
            self.check()

    def check(self) -> None:
        """Every section's checks, then the cross-field ones. Raises ConfigError."""
        for section in ("model", "mesh", "pipeline", "data", "optim", "train", "checkpoint"):
            getattr(self, section).check()
        self._check_combinations()

    def _check_combinations(self) -> None:
        m, d = self.model, self.data
        _require(d.microbatches % self.mesh.data == 0, "data.microbatches",
                 f"{d.microbatches} microbatches cannot be split over mesh.data={self.mesh.data} replicas")
        for name in m.modules:
            layers = m.module(name).layers
            _require(layers >= self.mesh.pipe, f"model.{name}.layers",
                     f"{name} has {layers} layers, fewer than mesh.pipe={self.mesh.pipe} pipeline ranks")
        for name in self.optim.frozen:
            _require(name in m.modules, "optim.frozen", f"module {name!r} is not in this model")
        self._check_tensor()
        if m.vision is not None and d.max_images:
            _require(m.vision.tokens_per_image <= d.seq_len, "model.vision.tokens_per_image",
                     f"{m.vision.tokens_per_image} tokens per image exceed data.seq_len={d.seq_len}")
        if m.audio is not None and d.max_audio_clips:
            _require(m.audio.tokens_per_clip <= d.seq_len, "model.audio",
                     f"{m.audio.tokens_per_clip} tokens per clip exceed data.seq_len={d.seq_len}")
        if d.task == "digits":
            _require(m.vision is not None, "data.task", "digits needs model.vision")
            _require(m.vision.image_size == 8 and m.vision.channels == 1, "model.vision.image_size",
                     "digits images are 8x8 with 1 channel (set image_size=8, channels=1)")
            _require(d.max_images >= d.digits_max_images, "data.max_images",
                     f"must be >= data.digits_max_images={d.digits_max_images}")
            _require(m.llm.vocab_size >= 16 + d.digits_max_images, "model.llm.vocab_size",
                     "digits needs 16 special/digit tokens plus one ordinal per image")

    def _check_tensor(self) -> None:
        """mesh.tensor splits attention heads, MLP hidden units and the vocabulary evenly."""
        tp = self.mesh.tensor
        if tp == 1:
            return
        for name in self.model.modules:
            sub = self.model.module(name)
            for field in ("heads", "kv_heads", "mlp_hidden") + (("vocab_size",) if name == "llm" else ()):
                v = getattr(sub, field)
                _require(v % tp == 0, f"model.{name}.{field}",
                         f"{field}={v} is not divisible by mesh.tensor={tp} (tensor parallelism splits it evenly)")

    def replace(self, **sections) -> "TrainConfig":
        return dataclasses.replace(self, **sections)


def with_overrides(base, path: tuple[str, ...], value):
    """Return a copy of the (nested, frozen) dataclass `base` with `path` set to `value`."""
    head, *rest = path
    if not rest:
        return dataclasses.replace(base, **{head: value})
    return dataclasses.replace(base, **{head: with_overrides(getattr(base, head), tuple(rest), value)})

