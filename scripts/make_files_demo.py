"""Write the files task's demo dataset (digit PNGs + LLaVA-style train/eval JSONL) and, with
--tokenizer, rebuild the shipped BPE tokenizer (dip_jax/data/files/demo_tokenizer).

    python scripts/make_files_demo.py runs/files_demo_data [--train 2000 --eval 200] [--blank]
    python scripts/make_files_demo.py --tokenizer

--blank writes every image as uniform grey: the control in which no answer can be read.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dip_jax.data.files.demo import write_dataset, write_tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--max-images", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blank", action="store_true")
    p.add_argument("--tokenizer", action="store_true")
    args = p.parse_args()
    if args.tokenizer:
        print(f"wrote {write_tokenizer()}")
    if args.out:
        d = write_dataset(args.out, args.train, args.eval, args.max_images, args.seed, args.blank)
        print(f"wrote {d}/train.jsonl, {d}/eval.jsonl and {d}/images/")
    if not (args.out or args.tokenizer):
        p.error("give an output directory or --tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
