"""Device profiles as data: peak rates, memory and efficiency factors per op class."""
from __future__ import annotations

import dataclasses
import json
import pathlib

PROFILE_DIR = pathlib.Path(__file__).parent / "profiles"
OP_CLASSES = ("matmul", "attention", "memory", "collective", "p2p")


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float          # dense bf16 FLOP/s of one device
    hbm_bandwidth: float       # bytes/s
    tp_link_bandwidth: float   # bytes/s per device inside a tensor-parallel group
    p2p_bandwidth: float       # bytes/s between neighbouring pipeline ranks
    p2p_latency: float         # seconds per pipeline send
    memory_bytes: float
    op_overhead: float         # fixed seconds per layer op (launches, syncs)
    efficiency: dict           # op class -> achieved fraction of the peak
    matmul_half_tokens: float = 0.0   # GEMM rows at which matmuls reach half their efficiency
    note: str = ""

    def __post_init__(self):
        missing = set(OP_CLASSES) - set(self.efficiency)
        if missing:
            raise ValueError(f"hardware profile {self.name!r}: efficiency lacks {sorted(missing)}")


def available() -> list[str]:
    """The shipped profiles, as files (config.HARDWARE_PROFILES names the same ones)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def resolve(name_or_path: str):
    """(Hardware, Calibration or None) of `pipeline.hardware`: a shipped profile's name, a
    hardware JSON, or a calibration profile (which names the hardware it refines)."""
    from dip_jax.plan.calibrated import read
    if name_or_path == "auto":
        raise ValueError("pipeline.hardware=auto is resolved when training starts (it calibrates); "
                         "give a profile name or a calibration file here")
    path = pathlib.Path(name_or_path)
    if path.suffix == ".json":
        if not path.exists():
            raise ValueError(f"pipeline.hardware: no such file {name_or_path!r}")
        cal = read(path)
        if cal is not None:
            return load(cal.base), cal
    return load(name_or_path), None


def load(name_or_path: str, overrides: dict | None = None) -> Hardware:
    """A shipped profile by name (h800, h100, tpu_v5e, cpu) or a JSON file path; `overrides`
    replaces fields (e.g. calibrated efficiency factors)."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(f"unknown hardware profile {name_or_path!r}; choose one of {available()} or a .json path")
    data = json.loads(path.read_text())
    if overrides:
        eff = {**data.get("efficiency", {}), **overrides.get("efficiency", {})}
        data = {**data, **overrides, "efficiency": eff}
    return Hardware(**data)
