"""Paper model T2V-L (Qwen2 32B + DiT 30B, TP 8, PP 8), H800, 8192-token microbatches.

For the planner (python -m dip_jax.plan); far too large to train on a CPU.
"""
from dip_jax.config.zoo import paper_config


def get_config():
    return paper_config("t2v_l", microbatches=32)
