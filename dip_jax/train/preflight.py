"""Refuse, before anything is allocated, a config whose state cannot fit the devices.

The estimate is the planner's memory model (dip_jax/plan/cost.py): 16 bytes per parameter for
weights, gradients and Adam moments, the transformer blocks divided over `mesh.pipe` x `mesh.tensor` and every
other parameter (embeddings, heads, projectors) on every device. It ignores activations, so a
config it lets through may still run out of memory; one it refuses cannot train here.
"""
from __future__ import annotations

import os

from dip_jax.config import ConfigError, TrainConfig
from dip_jax.plan.cost import STATE_BYTES_PER_PARAM


def state_bytes_per_device(cfg: TrainConfig) -> float:
    m = cfg.model
    total = m.param_count()
    blocks = sum(getattr(m, name).layers * getattr(m, name).block_params() for name in m.modules)
    return STATE_BYTES_PER_PARAM * (blocks / (cfg.mesh.pipe * cfg.mesh.tensor) + (total - blocks))


def host_memory_bytes() -> float | None:
    """Memory available to this process's CPU devices (they all share it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(device) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:                    # not every backend reports memory
        return None
    limit = stats.get("bytes_limit")
    return float(limit) if limit else None


def check_state_fits(cfg: TrainConfig, devices) -> None:
    """`devices`: the mesh's devices on this process. Raises ConfigError if the estimated state
    exceeds their memory (CPU devices share the host's)."""
    devices = list(devices)
    if not devices:
        return
    need = state_bytes_per_device(cfg)
    gb = lambda b: f"{b / 1e9:.3g} GB"
    hint = "; this config can only be planned here: python -m dip_jax.plan --config ..."
    if devices[0].platform == "cpu":
        have = host_memory_bytes()
        total = need * len(devices)
        if have is not None and total > have:
            raise ConfigError(f"model {cfg.model.name}: parameters + Adam state need ~{gb(need)} per device "
                              f"(16 bytes/param, blocks over mesh.pipe={cfg.mesh.pipe} x mesh.tensor={cfg.mesh.tensor}) x {len(devices)} CPU devices "
                              f"= {gb(total)}, but the host has {gb(have)} available{hint}")
        return
    have = device_memory_bytes(devices[0])
    if have is not None and need > have:
        raise ConfigError(f"model {cfg.model.name}: parameters + Adam state need ~{gb(need)} per device "
                          f"(16 bytes/param, blocks over mesh.pipe={cfg.mesh.pipe} x mesh.tensor={cfg.mesh.tensor}), but a {devices[0].device_kind} "
                          f"has {gb(have)}{hint}")
