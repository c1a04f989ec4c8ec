"""Paper model VLM-M (ViT 5B + Qwen2 32B, TP 8, PP 4), H800, 8192-token microbatches.

For the planner (python -m dip_jax.plan); far too large to train on a CPU.
"""
from dip_jax.config.zoo import paper_config


def get_config():
    return paper_config("vlm_m", microbatches=32)
