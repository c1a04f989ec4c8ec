"""Peak host memory of importing a large Hugging Face checkpoint.

    python scripts/bench_hf_import.py [--layers 6 --dim 2048 --mlp 5632 --vocab 32000] [--dir DIR]

writes a synthetic random Llama checkpoint (float32 safetensors in ~500 MB shards + index,
written tensor by tensor), then, in a fresh process, loads it through the forward checker's
import path (`dip_jax.hf.forward.load_module`: headers checked, tensors read one by one onto
the device, here the host CPU) and reports the peak resident set size (VmHWM) against the
checkpoint's size, beside the RSS after importing jax and dip_jax (the baseline).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = """
import sys, time, json
import jax
from dip_jax.hf.forward import load_module
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
jax.numpy.zeros(1).block_until_ready()            # the CPU client is up before the baseline
base = status("VmRSS:")
t = time.perf_counter()
_, cfg, module = load_module(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(module))
print(json.dumps({"baseline_kb": base, "peak_kb": status("VmHWM:"), "seconds": time.perf_counter() - t}))
"""


def write_checkpoint(out: pathlib.Path, layers: int, dim: int, mlp: int, vocab: int, heads: int) -> int:
    from dip_jax.hf.safetensors_io import write_sharded
    rng = np.random.default_rng(0)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": dim,
           "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "hidden_act": "silu"}

    def tensors():
        r = lambda *s: rng.standard_normal(s, dtype=np.float32) * 0.02
        yield "model.embed_tokens.weight", r(vocab, dim)
        for i in range(layers):
            p = f"model.layers.{i}."
            for n in "qkvo":
                yield p + f"self_attn.{n}_proj.weight", r(dim, dim)
            yield p + "mlp.gate_proj.weight", r(mlp, dim)
            yield p + "mlp.up_proj.weight", r(mlp, dim)
            yield p + "mlp.down_proj.weight", r(dim, mlp)
            yield p + "input_layernorm.weight", np.ones(dim, np.float32)
            yield p + "post_attention_layernorm.weight", np.ones(dim, np.float32)
        yield "model.norm.weight", np.ones(dim, np.float32)
        yield "lm_head.weight", r(vocab, dim)
    write_sharded(tensors(), out, 500 << 20)
    (out / "config.json").write_text(json.dumps(cfg))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = pathlib.Path(tmp) / "llama"
        t = time.perf_counter()
        size = write_checkpoint(ckpt, args.layers, args.dim, args.mlp, args.vocab, args.heads)
        print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s", flush=True)
        res = subprocess.run([sys.executable, "-c", CHILD, str(ckpt)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
    gib = lambda kb: kb / 2**20
    print(f"checkpoint {size / 2**30:.2f} GiB (float32); RSS after imports {gib(r['baseline_kb']):.2f} GiB, "
          f"peak {gib(r['peak_kb']):.2f} GiB: importing added "
          f"{(r['peak_kb'] - r['baseline_kb']) * 1024 / size:.2f} x the checkpoint's size, load {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
