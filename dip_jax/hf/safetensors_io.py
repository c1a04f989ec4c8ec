"""A Hugging Face checkpoint directory read tensor by tensor, and written back in shards.

Reading parses the safetensors headers (8-byte length, JSON of name -> dtype, shape, byte
offsets) and reads each requested tensor, or the band of rows a shard needs, with one
positioned read: the checkpoint is never in host memory at once, nothing is memory-mapped (a
mapped file's touched pages would stay resident), and bfloat16 tensors need no framework
(numpy has no bfloat16; its bits are widened to float32 here). Writing uses `safetensors`.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from dip_jax.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class HFError(ConfigError):
    """A checkpoint that does not match what its config.json says; the message names the file
    and the tensor."""


class Checkpoint:
    """config.json plus model.safetensors or a sharded index, in a local directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise HFError(f"{cfg_path}: no config.json (not a Hugging Face checkpoint directory)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise HFError(f"{cfg_path}: not valid JSON ({e})") from None
        self._headers: dict[str, dict] = {}
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            for name, file in sorted(weight_map.items()):
                if not (self.dir / file).is_file():
                    raise HFError(f"{index}: shard {file} (holding tensor {name}) is missing")
            return dict(weight_map)
        single = self.dir / SINGLE
        if not single.is_file():
            raise HFError(f"{self.dir}: neither {SINGLE} nor {INDEX}")
        return {name: SINGLE for name in self._header(SINGLE)}

    def _header(self, file: str) -> dict:
        if file not in self._headers:
            path = self.dir / file
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for entry in header.values():
                entry["start"] = 8 + n + entry["data_offsets"][0]
            self._headers[file] = header
        return self._headers[file]

    def names(self) -> set[str]:
        return set(self.files)

    def _entry(self, name: str) -> tuple[str, dict]:
        file = self.files.get(name)
        if file is None:
            raise HFError(f"{self.dir}: tensor {name} is missing (config.json asks for it)")
        entry = self._header(file).get(name)
        if entry is None:
            raise HFError(f"{self.dir / file}: tensor {name} is missing (the index names this shard)")
        return file, entry

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        file, entry = self._entry(name)
        if tuple(entry["shape"]) != tuple(expected):
            raise HFError(f"{self.dir / file}: tensor {name} has shape {tuple(entry['shape'])}, "
                          f"config.json implies {tuple(expected)}")

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Tensor `name` (its rows `rows` only: one contiguous read) as float32."""
        file, entry = self._entry(name)
        if entry["dtype"] not in _DTYPES:
            raise HFError(f"{self.dir / file}: tensor {name} has unsupported dtype {entry['dtype']}")
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        lead = shape[0] if shape else 1
        r0, r1, step = rows.indices(lead)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        count = (r1 - r0) * row // dtype.itemsize
        with open(self.dir / file, "rb") as f:
            f.seek(entry["start"] + r0 * row)
            a = np.fromfile(f, dtype=dtype, count=count)
        a = a.reshape((r1 - r0,) + shape[1:] if shape else ())
        if entry["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a[::step].astype(np.float32, copy=False)


def write_sharded(tensors, out: pathlib.Path, max_shard_bytes: int) -> None:
    """Write `tensors` (an iterable of (name, float32 array), produced lazily) as safetensors
    shards of at most `max_shard_bytes` (one tensor larger than that gets its own shard) plus
    the index transformers reads; one shard's tensors are in memory at a time."""
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0
    tmp_names = []

    def flush():
        nonlocal current, size
        if current:
            name = f"model-tmp-{len(shards):05d}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            tmp_names.append(name)
            current, size = {}, 0

    for name, a in tensors:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if current and size + a.nbytes > max_shard_bytes:
            flush()
        current[name] = a
        size += a.nbytes
        total += a.nbytes
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
