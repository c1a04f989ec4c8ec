"""Devices and the ('data', 'pipe', 'tensor') mesh.

On a host without an accelerator the CLI asks for 8 fake CPU devices; this must happen before
jax initialises its backends, so `configure_host_devices` is called before anything touches jax.
"""
from __future__ import annotations

import os
import sys

from dip_jax.config import ConfigError, TrainConfig

DEFAULT_CPU_DEVICES = 8
AXES = ("data", "pipe", "tensor")


def configure_host_devices(n: int = DEFAULT_CPU_DEVICES) -> None:
    """Ask for `n` CPU devices (used when no GPU/TPU is present); a no-op if already decided."""
    if "JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if "jax" in sys.modules:
        import jax
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:
            pass   # backends already initialised: keep what exists
        return
    os.environ["JAX_NUM_CPU_DEVICES"] = str(n)


def check_devices(cfg: TrainConfig, n_devices: int) -> None:
    if cfg.mesh.devices > n_devices:
        raise ConfigError(f"mesh: {_shape(cfg)} needs {cfg.mesh.devices} devices, only {n_devices} available")
    # The unpipelined step (and greedy decoding) shards microbatches over the data x pipe
    # devices of the mesh (each a tensor group); pipelined schedules only split them over the data
    # replicas (checked in config/train_config.py).
    unpipelined = cfg.pipeline.schedule == "none"
    groups = cfg.mesh.data * cfg.mesh.pipe
    if (unpipelined or cfg.data.task == "digits") and cfg.data.microbatches % groups:
        user = "pipeline.schedule=none shards them" if unpipelined else "greedy decoding (data.task=digits) shards them"
        raise ConfigError(f"data.microbatches: {cfg.data.microbatches} microbatches cannot be split over the "
                          f"{groups} {'devices' if cfg.mesh.tensor == 1 else 'tensor groups'} of mesh {_shape(cfg)} "
                          f"({user} over data x pipe)")


def _shape(cfg: TrainConfig) -> str:
    tensor = f" x tensor={cfg.mesh.tensor}" if cfg.mesh.tensor > 1 else ""
    return f"data={cfg.mesh.data} x pipe={cfg.mesh.pipe}{tensor}"


def make_mesh(data: int, pipe: int, tensor: int = 1, devices=None):
    """The mesh ('data', 'pipe', 'tensor'); a pipeline rank is a group of `tensor` devices."""
    import jax
    from jax.sharding import AxisType
    devices = list(jax.devices() if devices is None else devices)[: data * pipe * tensor]
    return jax.make_mesh((data, pipe, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_shape(mesh) -> dict[str, int]:
    """{axis: size} as runs report it: 'tensor' only when it splits the stages (size > 1), so a
    run without tensor parallelism reads as it always has (summaries, calibration keys)."""
    return {a: int(n) for a, n in mesh.shape.items() if a != "tensor" or n > 1}


def mesh_for(cfg: TrainConfig):
    import jax
    check_devices(cfg, jax.device_count())
    return make_mesh(cfg.mesh.data, cfg.mesh.pipe, cfg.mesh.tensor)
