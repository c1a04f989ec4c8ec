"""Tiny LMM (vision + audio + llm) on synthetic multimodal data: the default CPU job.

Trains with DIP: each batch is planned on the host and run by the pipelined executor on
mesh data=2 x pipe=4 (`--config.pipeline.schedule=none` is the unpipelined reference).
"""
from dip_jax.config import (AudioConfig, DataConfig, LLMConfig, MeshConfig, ModelConfig, OptimConfig,
                            PipelineConfig, TrainConfig, TrainSection, VisionConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            name="tiny_cpu",
            vision=VisionConfig(layers=4, dim=64, mlp_hidden=128, heads=4, kv_heads=2,
                                image_size=16, patch_size=4, channels=3, spatial_merge=2),
            audio=AudioConfig(layers=4, dim=64, mlp_hidden=128, heads=4, kv_heads=2),
            llm=LLMConfig(layers=4, dim=64, mlp_hidden=192, heads=4, kv_heads=2, vocab_size=256),
        ),
        mesh=MeshConfig(data=2, pipe=4),
        pipeline=PipelineConfig(schedule="dip", hardware="cpu"),
        data=DataConfig(seq_len=128, microbatches=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        train=TrainSection(steps=40, eval_every=0),
    )
