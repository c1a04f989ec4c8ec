"""Tiny random Hugging Face checkpoints for configs/llava_tiny.py (and for trying the import
path without a download):

    python scripts/make_tiny_hf.py [--out runs/hf_tiny]

writes OUT/siglip (a SiglipVisionModel: 4 layers, width 64, 16x16 images in 4x4 patches) and
OUT/qwen2 (a Qwen2ForCausalLM: 4 layers, width 64, GQA, vocabulary 256) with save_pretrained,
the backbone in several shards. Needs torch and transformers (the test extra).
"""
from __future__ import annotations

import argparse
import pathlib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/hf_tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    import transformers as T
    out = pathlib.Path(args.out)
    torch.manual_seed(args.seed)
    T.SiglipVisionModel(T.SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=16,
        patch_size=4, num_channels=3)).save_pretrained(out / "siglip")
    T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True)).save_pretrained(
        out / "qwen2", max_shard_size="200KB")
    print(f"wrote {out / 'siglip'} and {out / 'qwen2'}")


if __name__ == "__main__":
    main()
