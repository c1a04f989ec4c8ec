"""Paper model VLM-S (ViT 5B + Llama3 8B, TP 4, PP 4), H800, 8192-token microbatches.

For the planner (python -m dip_jax.plan); far too large to train on a CPU.
"""
from dip_jax.config.zoo import paper_config


def get_config():
    return paper_config("vlm_s", microbatches=32)
