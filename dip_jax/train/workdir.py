"""One run per workdir, and only with a model its checkpoints fit.

Process 0 holds an exclusive `fcntl` lock on DIR/.lock (released by the kernel when the process
ends, however it ends), so two runs never interleave checkpoints and metrics. Before anything is
restored, the new config is compared with DIR/config.json: a change of model shapes or of the
optimizer-state structure cannot restore, so it is refused in one line; config.json is rewritten
only after that check.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import socket

from dip_jax.config import ConfigError, TrainConfig
from dip_jax.train.errors import RunStopped

# model keys that do not change any parameter's shape
_SHAPELESS_MODEL_KEYS = {"model.name", "model.dit_loss_weight", "model.llm.rope_theta", "model.compute_dtype"}


def config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out




def incompatible_keys(saved: dict, new: dict) -> list[str]:
    """Keys whose change makes a checkpoint written under `saved` unrestorable under `new`:
    parameter shapes, the module set, and what shapes the optimizer state (frozen modules,
    gradient clipping on/off)."""
    a, b = _flatten(saved), _flatten(new)
    keys = []
    for k in sorted(set(a) | set(b)):
        if k.startswith("model.") and k not in _SHAPELESS_MODEL_KEYS:
            if k not in a or k not in b:
                module = ".".join(k.split(".")[:2])     # a module added or removed: name it once
                if module not in keys:
                    keys.append(module)
            elif a[k] != b[k]:
                keys.append(k)
    if a.get("optim.frozen") != b.get("optim.frozen"):
        keys.append("optim.frozen")
    if (a.get("optim.grad_clip", 0) > 0) != (b.get("optim.grad_clip", 0) > 0):
        keys.append("optim.grad_clip")
    return keys


def check_compatible(workdir: pathlib.Path, cfg: TrainConfig) -> None:
    """Raise ConfigError if `workdir` holds checkpoints of a config `cfg` cannot restore."""
    saved_path = workdir / "config.json"
    if not saved_path.exists() or not any((workdir / "checkpoints").glob("[0-9]*")):
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        return                                  # unreadable: the restore itself will judge
    new = config_dict(cfg)
    keys = incompatible_keys(saved, new)
    if keys:
        a, b = _flatten(saved), _flatten(new)
        shown = ", ".join(f"{k} {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys[:4])
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        raise ConfigError(f"--workdir {workdir} holds checkpoints of another model ({shown}{more}); "
                          f"use a new --workdir or the saved values")


def _holder(path: pathlib.Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def workdir_session(cfg: TrainConfig, workdir: pathlib.Path, lead: bool):
    """Lock `workdir`, check `cfg` against its saved config, then write config.json."""
    if not lead:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    lock_path = workdir / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = _holder(lock_path).partition("@")
            raise RunStopped(f"workdir {workdir} is in use by another run (pid {pid} on {host or 'unknown host'}, "
                             f"lock {lock_path}); wait for it to end or choose another --workdir", exit_code=1) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        check_compatible(workdir, cfg)
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        yield
    finally:
        os.close(fd)                            # closing the descriptor releases the lock
