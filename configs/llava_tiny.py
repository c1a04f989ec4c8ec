"""LLaVA-style: a pretrained SigLIP tower + a pretrained Qwen2 backbone, a new projector, the
tower frozen, trained pipelined under DIP on synthetic image-text data (mesh data=1 x pipe=2 x
tensor=2). The architectures come from the checkpoints' config.json; make the tiny random
ones first with `python scripts/make_tiny_hf.py` (or point `model.vision.init_from` and
`model.llm.init_from` at real checkpoint directories of these families).
"""
from dip_jax.config import (DataConfig, LLMConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig,
                            TrainConfig, TrainSection, VisionConfig)

CHECKPOINTS = "runs/hf_tiny"


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            name="llava_tiny",
            # feature_layer=-1: the last layer's hidden state, without SigLIP's final norm (LLaVA's
            # vision_feature_layer); spatial_merge is the new projector's 2x2 patch merge
            vision=VisionConfig(init_from=f"{CHECKPOINTS}/siglip", feature_layer=-1, spatial_merge=2),
            audio=None,
            llm=LLMConfig(init_from=f"{CHECKPOINTS}/qwen2"),
        ),
        mesh=MeshConfig(data=1, pipe=2, tensor=2),
        pipeline=PipelineConfig(schedule="dip", hardware="cpu"),
        data=DataConfig(seq_len=128, microbatches=4, max_images=4, max_audio_clips=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, frozen=("vision",)),
        train=TrainSection(steps=20, eval_every=0),
    )
