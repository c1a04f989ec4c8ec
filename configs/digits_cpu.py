"""Read handwritten digits in order: a ViT over 8x8 digit images feeding a small llm.

Samples hold 0-8 digit images; the answer lists the digits in order. Scored by greedy decoding
on samples built only from held-out images (eval_accuracy per digit, eval_sequence_accuracy
per whole answer).

Trains with the unpipelined reference step so that the 600 steps fit comfortably in a few
minutes on 2 CPU cores; `--config.pipeline.schedule=dip` runs the same math through the
pipelined executor (about 1 s per step on such a host).
"""
from dip_jax.config import (DataConfig, LLMConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
                            TrainSection, VisionConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            name="digits_cpu",
            vision=VisionConfig(layers=4, dim=64, mlp_hidden=128, heads=4, kv_heads=4,
                                image_size=8, patch_size=2, channels=1, spatial_merge=4),
            audio=None,
            llm=LLMConfig(layers=4, dim=64, mlp_hidden=128, heads=4, kv_heads=4, vocab_size=48),
        ),
        mesh=MeshConfig(data=2, pipe=4),
        data=DataConfig(task="digits", seq_len=64, microbatches=16, max_images=16, max_audio_clips=0,
                        max_video_clips=0, eval_samples=512),
        optim=OptimConfig(lr=2e-3, warmup_steps=20, end_lr_fraction=0.05),
        train=TrainSection(steps=600, log_every=10, eval_every=200),
    )
