"""Train on files: LLaVA-style records of handwritten digit images (PNG) read by a ViT feeding a
small llm, with the shipped BPE tokenizer and its chat template, through the pipelined trainer.

The records and images are written on first use to runs/files_demo_data (scripts/make_files_demo.py
writes them anywhere); each asks for the 1-3 digits shown, answered in words ("Four, three,
zero."), so the answers can only be read from the images. Evaluation decodes the answers of
records built from held-out images only (eval_accuracy per answer token, eval_sequence_accuracy
per whole answer). Any other dataset in the same format trains with --config.data.path=...
"""
from dip_jax.config import (DataConfig, LLMConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig,
                            TrainConfig, TrainSection, VisionConfig)
from dip_jax.data.files.demo import TOKENIZER_DIR, ensure_dataset

DATA = "runs/files_demo_data"


def get_config() -> TrainConfig:
    ensure_dataset(DATA)
    return TrainConfig(
        model=ModelConfig(
            name="files_demo",
            vision=VisionConfig(layers=4, dim=64, mlp_hidden=128, heads=4, kv_heads=4,
                                image_size=8, patch_size=2, channels=1, spatial_merge=4),
            audio=None,
            llm=LLMConfig(layers=4, dim=64, mlp_hidden=128, heads=4, kv_heads=4, vocab_size=192),
        ),
        mesh=MeshConfig(data=2, pipe=4),
        pipeline=PipelineConfig(schedule="dip", hardware="cpu"),
        data=DataConfig(task="files", path=f"{DATA}/train.jsonl", eval_path=f"{DATA}/eval.jsonl",
                        tokenizer=str(TOKENIZER_DIR), seq_len=128, microbatches=8, max_images=12,
                        max_audio_clips=0, max_video_clips=0, eval_samples=200),
        optim=OptimConfig(lr=2e-3, warmup_steps=20, end_lr_fraction=0.05),
        train=TrainSection(steps=300, log_every=10, eval_every=0),
    )
