"""The whole config of a run: the model and the run sections, and the checks across them."""
from __future__ import annotations

import dataclasses
import os

from dip_jax.config.checks import DEFER_CHECKS, require
from dip_jax.config.model import ModelConfig
from dip_jax.config.run import (CheckpointConfig, DataConfig, DistributedConfig, MeshConfig, OptimConfig, PipelineConfig,
                                TrainSection)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    pipeline: PipelineConfig = PipelineConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        if not DEFER_CHECKS.get():
            self.check()

    def check(self) -> None:
        """Every section's checks, then the cross-field ones. Raises ConfigError."""
        for section in ("model", "mesh", "pipeline", "data", "optim", "train", "checkpoint", "distributed"):
            getattr(self, section).check()
        self._check_combinations()

    def tokenizer_dir(self) -> str:
        """`data.tokenizer`, else the backbone's pretrained directory when it holds a tokenizer
        (a Hugging Face model directory ships its own), else ""."""
        if self.data.tokenizer:
            return self.data.tokenizer
        source = getattr(self.model.llm, "init_from", "")
        return source if source and os.path.isfile(os.path.join(source, "tokenizer.json")) else ""

    def _check_combinations(self) -> None:
        m, d = self.model, self.data
        if d.task == "files":
            require(bool(self.tokenizer_dir()), "data.tokenizer", "the files task needs a tokenizer directory "
                    "(or a model.llm.init_from directory that holds tokenizer.json)")
        require(d.microbatches % self.mesh.data == 0, "data.microbatches",
                f"{d.microbatches} microbatches cannot be split over mesh.data={self.mesh.data} replicas")
        for name in m.modules:
            layers = m.module(name).layers
            require(layers >= self.mesh.pipe, f"model.{name}.layers",
                    f"{name} has {layers} layers, fewer than mesh.pipe={self.mesh.pipe} pipeline ranks")
        for name in self.optim.frozen:
            require(name in m.modules, "optim.frozen", f"module {name!r} is not in this model")
        self._check_tensor()
        if m.vision is not None and d.max_images:
            require(m.vision.tokens_per_image <= d.seq_len, "model.vision.tokens_per_image",
                    f"{m.vision.tokens_per_image} tokens per image exceed data.seq_len={d.seq_len}")
        if m.audio is not None and d.max_audio_clips:
            require(m.audio.tokens_per_clip <= d.seq_len, "model.audio",
                    f"{m.audio.tokens_per_clip} tokens per clip exceed data.seq_len={d.seq_len}")
        if d.task == "digits":
            require(m.vision is not None, "data.task", "digits needs model.vision")
            require(m.vision.image_size == 8 and m.vision.channels == 1, "model.vision.image_size",
                    "digits images are 8x8 with 1 channel (set image_size=8, channels=1)")
            require(d.max_images >= d.digits_max_images, "data.max_images",
                    f"must be >= data.digits_max_images={d.digits_max_images}")
            require(m.llm.vocab_size >= 16 + d.digits_max_images, "model.llm.vocab_size",
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
                require(v % tp == 0, f"model.{name}.{field}",
                        f"{field}={v} is not divisible by mesh.tensor={tp} (tensor parallelism splits it evenly)")

    def replace(self, **sections) -> "TrainConfig":
        return dataclasses.replace(self, **sections)


def with_overrides(base, path: tuple[str, ...], value):
    """Return a copy of the (nested, frozen) dataclass `base` with `path` set to `value`."""
    head, *rest = path
    if not rest:
        return dataclasses.replace(base, **{head: value})
    return dataclasses.replace(base, **{head: with_overrides(getattr(base, head), tuple(rest), value)})
