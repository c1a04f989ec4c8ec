"""XLA flags for GPU runs (`pipeline.xla_flags`), set before jax creates a backend.

XLA reads XLA_FLAGS once, when the first backend starts, so the CLI calls `apply` right after
the config is read and before anything initialises jax. Whether the run will be on a GPU is
therefore decided without jax (`gpu_expected`):
- JAX_PLATFORMS (or the older JAX_PLATFORM_NAME), when set, is what jax will use: a GPU iff it
  names cuda, rocm or gpu;
- otherwise CUDA_VISIBLE_DEVICES="" or "-1" hides every GPU;
- otherwise a GPU needs both an NVIDIA device file (/dev/nvidia0, ...) and jax's CUDA plugin
  installed (jax[cuda12] / jax[cuda13]), which is what jax's own backend discovery needs.
A wrong "yes" is harmless (XLA:CPU ignores xla_gpu_* flags); a wrong "no" only loses speed.

The auto flags:
- `--xla_gpu_enable_command_buffer=...`: the command buffer (CUDA graph) types. The defaults
  (FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN, DYNAMIC_SLICE_FUSION) plus WHILE, CONDITIONAL
  and COLLECTIVES: a loop or conditional is captured only when every op in its body is a
  command, and the executor's tick loop holds its collective-permutes; captured, XLA stops
  synchronising with the host for each loop trip and branch.
- `--xla_gpu_enable_latency_hiding_scheduler=true`: schedules collectives to overlap compute.
A flag already in XLA_FLAGS is left as the user set it.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Mapping

COMMAND_BUFFER = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "DYNAMIC_SLICE_FUSION",
                  "WHILE", "CONDITIONAL", "COLLECTIVES")
GPU_FLAGS = (f"--xla_gpu_enable_command_buffer={','.join(COMMAND_BUFFER)}",
             "--xla_gpu_enable_latency_hiding_scheduler=true")
_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def _has_plugin() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in _CUDA_PLUGINS)


def gpu_expected(env: Mapping[str, str], device_files: bool | None = None, plugin: bool | None = None) -> bool:
    """Whether jax will start on a GPU, decided from the environment alone (jax not imported)."""
    platforms = env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME")
    if platforms:
        return any(p.strip() in ("cuda", "rocm", "gpu") for p in platforms.lower().split(","))
    if env.get("CUDA_VISIBLE_DEVICES") is not None and env["CUDA_VISIBLE_DEVICES"].strip() in ("", "-1"):
        return False
    files = bool(glob.glob("/dev/nvidia[0-9]*")) if device_files is None else device_files
    return files and (_has_plugin() if plugin is None else plugin)


def flags_for(setting: str, gpu: bool) -> tuple[str, ...]:
    """The flags `pipeline.xla_flags=setting` adds: auto -> GPU_FLAGS on a GPU, none -> (),
    an explicit string -> its flags, on any backend (the user chose them)."""
    if setting == "none" or (setting == "auto" and not gpu):
        return ()
    if setting == "auto":
        return GPU_FLAGS
    return tuple(setting.split())


def merged(existing: str, add: tuple[str, ...]) -> str:
    """`existing` XLA_FLAGS with `add` appended, except flags whose name it already sets."""
    names = {f.split("=", 1)[0] for f in existing.split()}
    new = [f for f in add if f.split("=", 1)[0] not in names]
    return " ".join([*existing.split(), *new])


def apply(setting: str, env=None) -> str | None:
    """Append the flags to XLA_FLAGS in `env` (os.environ); returns the new value, or None
    when nothing changed. Must run before jax initialises a backend."""
    env = os.environ if env is None else env
    add = flags_for(setting, gpu_expected(env) if setting == "auto" else False)
    old = env.get("XLA_FLAGS", "")
    new = merged(old, add)
    if new == " ".join(old.split()):
        return None
    env["XLA_FLAGS"] = new
    return new
