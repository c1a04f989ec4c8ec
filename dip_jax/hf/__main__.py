"""`python -m dip_jax.hf forward --checkpoint DIR --inputs IN.npz --out OUT.npz`
`python -m dip_jax.hf export --workdir RUN [--step N] --module llm --out DIR [--max-shard-mb M]`

forward: loads DIR through the import path (the family from its config.json's model_type) and
runs the module in float32 on the inputs, named as transformers names them: input_ids ->
logits (Llama, Qwen2), pixel_values -> last_hidden_state (SigLIP, CLIP vision towers),
input_features -> last_hidden_state (the Whisper encoder).
export: the trained module of a run's checkpoint as a Hugging Face directory.

This file is the command's application entry: `export` reads a run's orbax checkpoint, which
is the trainer's business (train/export.py), so this one module of hf/ imports train/ (the
import contracts exempt it by name; nothing imports it).
"""
from __future__ import annotations

import argparse
import sys

USAGE = __doc__.split("\n\n")[0]


def main(argv=None) -> int:
    from dip_jax.config import ConfigError
    parser = argparse.ArgumentParser(prog="python -m dip_jax.hf", usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forward")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--inputs", required=True)
    f.add_argument("--out", required=True)
    e = sub.add_parser("export")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None)
    e.add_argument("--module", default="llm")
    e.add_argument("--out", required=True)
    e.add_argument("--max-shard-mb", type=float, default=2048.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "forward":
            import numpy as np
            from dip_jax.hf.forward import forward
            try:
                with np.load(args.inputs) as z:
                    inputs = {k: z[k] for k in z.files}
            except OSError as err:
                raise ConfigError(f"{args.inputs}: cannot read inputs ({err})") from None
            np.savez(args.out, **forward(args.checkpoint, inputs))
        else:
            from dip_jax.train.export import export_run
            out = export_run(args.workdir, args.module, args.out, args.step, int(args.max_shard_mb * 2 ** 20))
            print(f"dip_jax.hf: exported model.{args.module} to {out}")
    except ConfigError as err:
        print(f"dip_jax.hf: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
