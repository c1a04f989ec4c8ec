"""Input pipeline throughput of the files task, on one core: records per second read, decoded,
preprocessed, packed and collated (what the step loop waits for), the index build rate, and the
padding left by best-fit packing against the greedy packer on the same record order.

    python scripts/bench_data.py [--batches 40] [--jpegs 400] [--json runs/bench_data.json]
    python scripts/bench_data.py --workers 0,1,2 [--json ...]

`--workers`: instead, the trainer's own grain pipeline (`data.workers` worker processes, not
pinned to a core) as the step loop reads it: records/s once running, and the first batch's wait
(worker start-up included).

Two datasets: the demo (8x8 digit PNGs, 1-3 per record, 8x8 grayscale encoder input) and
224x224 RGB JPEGs (1-2 per record, a 224x224 encoder input), both LLaVA-style with the shipped
tokenizer. Generated under runs/bench_data/ on first use.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dip_jax.config.overrides import apply_overrides, load_config_file  # noqa: E402
from dip_jax.data.collate import collate  # noqa: E402
from dip_jax.data.files.demo import TOKENIZER_DIR, write_dataset  # noqa: E402
from dip_jax.data.files.source import FileStream  # noqa: E402
from dip_jax.data.packing import pack_greedy, padding_fraction  # noqa: E402


def jpeg_dataset(d: pathlib.Path, n: int) -> pathlib.Path:
    from PIL import Image
    if (d / "train.jsonl").is_file():
        return d / "train.jsonl"
    (d / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        paths = []
        for j in range(int(rng.integers(1, 3))):
            base = rng.integers(0, 255, (28, 28, 3)).astype(np.uint8)       # smooth content, like photos
            Image.fromarray(base).resize((224, 224), Image.Resampling.BICUBIC).save(d / f"img/{i}_{j}.jpg", quality=90)
            paths.append(f"img/{i}_{j}.jpg")
        lines.append(json.dumps({"image": paths, "conversations": [
            {"from": "human", "value": "<image>" * len(paths) + "\nDescribe the picture."},
            {"from": "gpt", "value": "Three, one, four, one, five."}]}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d / "train.jsonl"


def measure(cfg, batches: int, cache: pathlib.Path) -> dict:
    t0 = time.perf_counter()
    stream = FileStream(cfg, "train", cache)
    index_s = time.perf_counter() - t0
    n_records = len(stream.dataset.refs)
    stream.layout(batches + 1)
    records = 0
    t0 = time.perf_counter()
    for i in range(batches):
        packed, _ = stream.samples(i)
        collate(packed, cfg, 0, stream.dataset.placeholders)
        records += sum(map(len, packed))
    dt = time.perf_counter() - t0
    best = [padding_fraction(stream.metadata(i), stream.budget) for i in range(batches)]
    # the greedy packer over the same first epoch's order
    order = stream._order(0)
    metas = [stream.dataset.refs[r].meta for r in order]
    greedy, start = [], 0
    while len(greedy) < batches and start < len(metas):
        mbs, used = pack_greedy(metas[start:], stream.budget, cfg.data.microbatches)
        if len(mbs) < cfg.data.microbatches:
            break
        greedy.append(padding_fraction([[metas[start + j] for j in mb] for mb in mbs], stream.budget))
        start += used
    return {"records": n_records, "index_records_per_s": n_records / index_s, "records_per_s": records / dt,
            "batches_per_s": batches / dt, "records_per_batch": records / batches,
            "padding_best_fit": float(np.mean(best)), "padding_greedy": float(np.mean(greedy))}


def measure_pipeline(cfg, batches: int, cache: pathlib.Path, workers: int) -> dict:
    from dip_jax.data.pipeline import train_iterator
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=workers))
    FileStream(cfg, "train", cache)                          # the index, built once before timing
    t0 = time.perf_counter()
    it = train_iterator(cfg, cache)
    next(it)
    first = time.perf_counter() - t0
    records, t0 = 0, time.perf_counter()
    for _ in range(batches):
        records += sum(map(len, next(it).metadata))
    dt = time.perf_counter() - t0
    return {"workers": workers, "records_per_s": records / dt, "batches_per_s": batches / dt,
            "first_batch_seconds": first}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--jpegs", type=int, default=400, help="records of the JPEG dataset")
    p.add_argument("--json", default=None)
    p.add_argument("--workers", default=None, help="comma-separated data.workers values: measure the grain pipeline")
    args = p.parse_args()
    workers = None if args.workers is None else [int(w) for w in args.workers.split(",")]
    if workers is None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    work = ROOT / "runs/bench_data"
    demo = work / "demo"
    if not (demo / "train.jsonl").is_file():
        write_dataset(demo)
    demo_cfg = load_config_file(str(ROOT / "configs/files_demo.py"))
    demo_cfg = apply_overrides(demo_cfg, [f"data.path={demo / 'train.jsonl'}", "data.eval_path="])
    jpeg = jpeg_dataset(work / "jpeg224", args.jpegs)
    jcfg = apply_overrides(load_config_file(str(ROOT / "configs/tiny_cpu.py")),
                           ["data.task=files", f"data.path={jpeg}", f"data.tokenizer={TOKENIZER_DIR}", "model.audio=none",
                            "model.vision.image_size=224", "model.vision.patch_size=14", "data.seq_len=512",
                            "data.max_images=12"])
    out = {}
    for name, cfg in (("demo (8x8 PNG)", demo_cfg), ("224x224 JPEG", jcfg)):
        cache = work / f"cache_{len(out)}"
        if workers is not None:
            out[name] = rows = [measure_pipeline(cfg, args.batches, cache, w) for w in workers]
            for r in rows:
                print(f"{name:16s} data.workers={r['workers']}: {r['records_per_s']:8.0f} records/s "
                      f"({r['batches_per_s']:.1f} batches/s), first batch {r['first_batch_seconds']:.2f} s", flush=True)
            continue
        for f in cache.glob("*.json") if cache.exists() else ():
            f.unlink()                                       # measure the index build, not the cache
        out[name] = r = measure(cfg, args.batches, cache)
        print(f"{name:16s} {r['records_per_s']:8.0f} records/s/core ({r['batches_per_s']:.1f} batches/s of "
              f"{r['records_per_batch']:.1f}), index {r['index_records_per_s']:.0f} records/s; padding best-fit "
              f"{100 * r['padding_best_fit']:.1f}% vs greedy {100 * r['padding_greedy']:.1f}%", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
