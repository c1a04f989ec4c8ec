"""The run sections of a config: mesh, pipeline, data, optimizer, training loop, checkpoints."""
from __future__ import annotations

import dataclasses

from dip_jax.config.checks import positive, require
from dip_jax.config.model import MODULES

BASELINES = ("gpipe", "1f1b", "interleaved_1f1b", "encoders_first")   # static schedules DIP is compared with
SCHEDULERS = ("dip", *BASELINES)                     # what the executor runs
SCHEDULES = (*SCHEDULERS, "none")                    # pipeline.schedule: a scheduler or the unpipelined step
MEMORY_STRATEGIES = ("auto", "recompute", "store")   # pipeline.memory_strategy (dip_jax.plan.memory)
REMATS = ("auto", "chunk", "layers")                  # pipeline.remat (dip_jax.runtime.executor)
# the cost profiles the planner ships (dip_jax/plan/profiles/NAME.json; a test keeps the two equal)
HARDWARE_PROFILES = ("cpu", "h100", "h800", "tpu_v5e")
OVERSIZE = ("truncate", "skip", "error")
TASKS = ("synthetic", "digits", "files")
BAD_RECORDS = ("skip", "error")
ON_NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    pipe: int = 1
    tensor: int = 1   # devices per pipeline rank: each chunk's layers are split over them (Megatron-style)

    def check(self) -> None:
        positive(self, "mesh", "data", "pipe", "tensor")

    @property
    def devices(self) -> int:
        return self.data * self.pipe * self.tensor


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    schedule: str = "none"
    hardware: str = "cpu"              # cost profile: a shipped name, a .json file, or "auto" (calibrate at start)
    memory_cap_gb: float = 80.0
    memory_strategy: str = "recompute"  # per op: auto (store what the cap allows) | recompute | store
    # what a recomputing backward keeps while it runs: chunk = every layer's residuals of the
    # chunk's recomputed forward; layers = only each layer's input, each layer's forward run once
    # more in the backward (one more forward per backward op, a layer's residuals at a time);
    # auto = layers for the modules whose chunk residuals pass 1 GiB per device, chunk otherwise
    remat: str = "auto"
    search_rollouts: int = 8           # DIP search budget per batch (deterministic)
    step_cache_size: int = 8           # compiled pipeline programs kept (LRU)
    compile_cache_dir: str = ""        # persistent XLA compilation cache shared across runs ("" = off)
    plan_workers: int = 1              # background planner processes (0 = plan inline, in the step loop)
    plan_ahead: int = 2                # batches planned ahead of the one running
    plan_deadline_seconds: float = 10.0  # longest wait for a plan before the interleaved-1F1B fallback
    plan_faults: tuple = ()            # ((step, "raise" | "late"), ...): make the planner fail, to test fallback
    # XLA flags the CLI appends to XLA_FLAGS before jax starts (dip_jax/train/xla_flags.py):
    # auto = GPU command buffers (collectives, loops, conditionals too) and the latency-hiding
    # scheduler, on a GPU only; none; or an explicit "--flag=value ..." string (any backend)
    xla_flags: str = "auto"

    def check(self) -> None:
        positive(self, "pipeline", "search_rollouts", "step_cache_size", "plan_ahead", "plan_deadline_seconds")
        require(self.plan_workers >= 0, "pipeline.plan_workers", f"must be >= 0, got {self.plan_workers!r}")
        for fault in self.plan_faults:
            require(isinstance(fault, tuple) and len(fault) == 2 and isinstance(fault[0], int)
                    and fault[1] in ("raise", "late"), "pipeline.plan_faults",
                    f"entries are (step, 'raise' | 'late'), got {fault!r}")
        require(self.schedule in SCHEDULES, "pipeline.schedule",
                f"unknown scheduler {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        require(self.memory_cap_gb > 0, "pipeline.memory_cap_gb", "must be > 0")
        require(self.xla_flags in ("auto", "none") or all(f.startswith("--") for f in self.xla_flags.split()),
                "pipeline.xla_flags", f"auto, none, or flags like --xla_name=value, got {self.xla_flags!r}")
        require(self.remat in REMATS, "pipeline.remat",
                f"unknown remat {self.remat!r}; choose one of {', '.join(REMATS)}")
        require(self.memory_strategy in MEMORY_STRATEGIES, "pipeline.memory_strategy",
                f"unknown memory strategy {self.memory_strategy!r}; choose one of {', '.join(MEMORY_STRATEGIES)}")
        require(self.hardware == "auto" or self.hardware.endswith(".json") or self.hardware in HARDWARE_PROFILES,
                "pipeline.hardware", f"{self.hardware!r} is neither 'auto', a .json profile nor one of "
                f"{', '.join(HARDWARE_PROFILES)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "synthetic"            # synthetic | digits | files
    seq_len: int = 128
    microbatches: int = 8              # packed microbatches per global batch (all replicas)
    max_images: int = 8                # image slots per microbatch
    max_audio_clips: int = 4           # audio clip slots per microbatch
    max_video_clips: int = 4           # video clip slots per microbatch
    seed: int = 0
    prefetch: int = 2
    workers: int = 0                   # grain worker processes building batches (0: a thread of the trainer's)
    decode_shares: bool = True         # files task, several processes: each decodes only its replicas' records
    log_records: bool = False          # files task: each process logs the records it decoded per step
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
    # files task: conversation records (LLaVA or messages format; README: Train on your own data)
    path: str = ""                     # a .jsonl / .parquet file, a glob, or a directory of shards
    eval_path: str = ""                # held-out records for evaluation ("" = no evaluation)
    media_root: str = ""               # media paths are relative to this ("" = each record file's directory)
    tokenizer: str = ""                # a directory with tokenizer.json (+ tokenizer_config.json's chat_template)
    bad_records: str = "skip"          # a record that cannot train: skip and count it, or stop naming file:line
    image_tiles_max: int = 1           # > 1: large images become a thumbnail + tiles (LLaVA-NeXT anyres)
    image_tile_size: int = 336         # tile side in source pixels that the anyres grid is chosen on

    def check(self) -> None:
        require(self.task in TASKS, "data.task", f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        require(self.bad_records in BAD_RECORDS, "data.bad_records",
                f"unknown policy {self.bad_records!r}; choose one of {', '.join(BAD_RECORDS)}")
        if self.task == "files":
            require(bool(self.path), "data.path", "the files task needs record files (JSONL or Parquet)")
        else:                          # keys only the files task reads must not be set in vain
            for name, default in (("path", ""), ("eval_path", ""), ("media_root", ""), ("tokenizer", ""),
                                  ("bad_records", "skip"), ("image_tiles_max", 1), ("image_tile_size", 336),
                                  ("decode_shares", True), ("log_records", False)):
                require(getattr(self, name) == default, f"data.{name}",
                        f"only data.task=files reads it (data.task is {self.task!r})")
        positive(self, "data", "image_tiles_max", "image_tile_size")
        require(self.oversize in OVERSIZE, "data.oversize",
                f"unknown policy {self.oversize!r}; choose one of {', '.join(OVERSIZE)}")
        positive(self, "data", "seq_len", "microbatches", "prefetch", "eval_samples")
        require(self.workers >= 0, "data.workers", "must be >= 0")
        for n in ("max_images", "max_audio_clips", "max_video_clips", "digits_max_images"):
            require(getattr(self, n) >= 0, f"data.{n}", "must be >= 0")
        for n in ("mix_caption", "mix_interleaved", "mix_audio", "mix_video"):
            require(getattr(self, n) >= 0, f"data.{n}", "must be >= 0")


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
        require(self.lr > 0, "optim.lr", "must be > 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.schedule in ("cosine", "constant"), "optim.schedule", "choose cosine or constant")
        require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
        for item in self.lr_multipliers:
            require(isinstance(item, tuple) and len(item) == 2 and item[0] in MODULES
                    and isinstance(item[1], (int, float)), "optim.lr_multipliers",
                    f"entries are (module, multiplier) with module in {MODULES}; got {item!r}")
        for m in self.frozen:
            require(m in MODULES, "optim.frozen", f"unknown module {m!r}")


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
        positive(self, "train", "steps", "log_every", "max_nonfinite_steps")
        for name in ("eval_every", "timeline_every", "timeline_first"):
            require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        require(self.on_nonfinite in ON_NONFINITE, "train.on_nonfinite",
                f"unknown policy {self.on_nonfinite!r}; choose one of {', '.join(ON_NONFINITE)}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # a process of a multi-process run whose heartbeat stops for this long is lost (one that dies
    # is noticed sooner, at the next collective) and every other process stops with one line; it
    # also bounds the wait at the closing barrier, and twice it is jax's own heartbeat timeout
    timeout_seconds: float = 120.0

    def check(self) -> None:
        positive(self, "distributed", "timeout_seconds")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 20                    # a preempted run loses at most this many steps
    keep: int = 2

    def check(self) -> None:
        positive(self, "checkpoint", "every", "keep")
