"""The paper's modules (DIP, Table 2) and model setups (Table 3), as config values.

They are for the planner and the analytic parameter counts; never materialise them on a CPU.
Images: 728 px, patch 14, 4x4 spatial merge -> 169 tokens per image (Qwen2-VL style).
Video: 1 s dit clips of 2 latent frames x 48x48 latent patches (16 FPS, 8x temporal and 16x
spatial compression of a 768 px frame), conditioned on up to 256 caption states.
"""
from __future__ import annotations

from dip_jax.config import (DataConfig, DiTConfig, LLMConfig, MeshConfig, ModelConfig, PipelineConfig,
                            TrainConfig, VisionConfig)

_IMAGE = dict(image_size=728, patch_size=14, channels=3, spatial_merge=4)

VIT_5B = VisionConfig(layers=63, dim=1792, mlp_hidden=15360, heads=16, kv_heads=16, **_IMAGE)
VIT_22B = VisionConfig(layers=48, dim=6144, mlp_hidden=24576, heads=48, kv_heads=48, **_IMAGE)
LLAMA3_8B = LLMConfig(layers=32, dim=4096, mlp_hidden=14336, heads=32, kv_heads=8, vocab_size=128256,
                      rope_theta=500000.0)
QWEN2_32B = LLMConfig(layers=64, dim=5120, mlp_hidden=27648, heads=40, kv_heads=8, vocab_size=152064,
                      rope_theta=1000000.0)
QWEN2_72B = LLMConfig(layers=80, dim=8192, mlp_hidden=29568, heads=64, kv_heads=8, vocab_size=152064,
                      rope_theta=1000000.0)
_VIDEO = dict(latent_channels=64, latent_frames_per_second=2, tokens_per_frame=2304, clip_seconds=1.0,
              cond_tokens=256, time_embed_dim=256)
DIT_5B = DiTConfig(layers=28, dim=3584, mlp_hidden=10240, heads=28, kv_heads=28, **_VIDEO)
DIT_30B = DiTConfig(layers=48, dim=6144, mlp_hidden=24576, heads=48, kv_heads=48, **_VIDEO)

# name: (encoder/decoder modules, TP, PP, nominal size in B as the paper states it)
PAPER_MODELS = {
    "vlm_s": (dict(vision=VIT_5B, llm=LLAMA3_8B), 4, 4, "ViT 5B + Llama3 8B"),
    "vlm_m": (dict(vision=VIT_5B, llm=QWEN2_32B), 8, 4, "ViT 5B + Qwen2 32B"),
    "vlm_l": (dict(vision=VIT_22B, llm=QWEN2_72B), 8, 8, "ViT 22B + Qwen2 72B"),
    "t2v_s": (dict(llm=LLAMA3_8B, dit=DIT_5B), 4, 4, "Llama3 8B + DiT 5B"),
    "t2v_l": (dict(llm=QWEN2_32B, dit=DIT_30B), 8, 8, "Qwen2 32B + DiT 30B"),
}


def paper_config(name: str, microbatches: int = 32) -> TrainConfig:
    modules, tp, pp, _ = PAPER_MODELS[name]
    is_vlm = "vision" in modules
    # the paper trains in bf16: its cost model counts 2 bytes per activation
    model = ModelConfig(name=name, vision=modules.get("vision"), audio=None, llm=modules["llm"],
                        dit=modules.get("dit"), compute_dtype="bfloat16")
    data = DataConfig(seq_len=8192, microbatches=microbatches, max_images=48 if is_vlm else 0,
                      max_audio_clips=0, max_video_clips=0 if is_vlm else 16,
                      mix_caption=0.5 if is_vlm else 0.0, mix_interleaved=0.5 if is_vlm else 0.0,
                      mix_audio=0.0, mix_video=0.0 if is_vlm else 1.0,
                      interleaved_tokens_per_image_median=120.0, interleaved_max_images=24)
    return TrainConfig(model=model, mesh=MeshConfig(data=1, pipe=pp, tensor=tp), data=data,
                       pipeline=PipelineConfig(schedule="dip", hardware="h800", memory_cap_gb=80.0))
