"""Each process of a multi-process run is supervised: `python -m dip_jax.train` starts the
trainer as its child and stays beside it, so that the command a scheduler started ends in one
line and an exit code it can act on, whatever happens to the trainer.

- Signals: the supervisor takes SIGTERM / SIGINT and passes each one through a pipe; the trainer
  ignores signals sent to it directly (a scheduler that signals every process of a job reaches
  both), so each signal counts once (`train/interrupt.py`).
- Native aborts: jax's coordination client ends its process with SIGABRT and a page of native
  log and stack when it loses the coordinator (process 0). The supervisor drops those lines and
  prints one line instead: the process lost, the last complete checkpoint, the rerun command.
- Exit codes: the trainer's, except a trainer ended by a signal: 1 after such an abort, else
  128 + the signal.

Pure Python, no jax: the supervisor is small and never holds an accelerator.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from dip_jax.train.interrupt import SIGNAL_FD, SIGNALS

DISTRIBUTED_FLAGS = {"--coordinator": str, "--num-processes": int, "--process-id": int}


def distributed_args(rest: list[str]) -> tuple[dict, list[str]]:
    """Pull the multi-process flags out of the arguments the config parser did not take."""
    from dip_jax.config import ConfigError
    out, left, i = {}, [], 0
    while i < len(rest):
        name, _, value = rest[i].partition("=")
        if name == "--distributed" and not value:
            out["auto"] = True
        elif name in DISTRIBUTED_FLAGS:
            if not value:
                if i + 1 >= len(rest):
                    raise ConfigError(f"{name} needs a value")
                i += 1
                value = rest[i]
            try:
                out[name[2:].replace("-", "_")] = DISTRIBUTED_FLAGS[name](value)
            except ValueError:
                raise ConfigError(f"{name}: expected {DISTRIBUTED_FLAGS[name].__name__}, got {value!r}") from None
        else:
            left.append(rest[i])
        i += 1
    return out, left


# jax's native (absl) log lines, crash reports and the stack frames that follow them
_NATIVE = re.compile(r"^[EF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]|^\*\*\* Check failure stack trace|"
                     r"^\s+@\s+0x|^terminate called|^\s+what\(\):")
# what ends a native report's continuation lines: the trainer's own output
_OURS = re.compile(r"^(dip_jax|train|Traceback|[IW]\d{4} )")
_LEAK = re.compile(r"resource_tracker.*UserWarning|^\s+warnings\.warn\(")      # planner workers' semaphores


def wanted(argv: list[str]) -> bool:
    """A multi-process run not yet supervised."""
    if os.environ.get(SIGNAL_FD) or any(a in ("-h", "--help") for a in argv):
        return False
    flags = (*DISTRIBUTED_FLAGS, "--distributed")
    return any(a.split("=", 1)[0] in flags for a in argv) or "JAX_COORDINATOR_ADDRESS" in os.environ


def run(argv: list[str]) -> int:
    read, write = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "dip_jax.train", *argv], pass_fds=(read,),
                             env={**os.environ, SIGNAL_FD: str(read)}, stderr=subprocess.PIPE,
                             start_new_session=True)
    os.close(read)

    def forward(signum, frame):
        try:
            os.write(write, bytes([signum]))
        except OSError:
            pass
    for sig in SIGNALS:
        signal.signal(sig, forward)
    native = []
    in_native = False
    for raw in _segments(child.stderr.fileno()):
        line = raw.decode(errors="replace")
        if _NATIVE.search(line) or (in_native and not _OURS.match(line)):
            in_native = True
            native.append(line)
            continue
        in_native = False
        if not _LEAK.search(line):
            sys.stderr.write(line)
            sys.stderr.flush()
    code = child.wait()
    if code >= 0:
        return code
    signum = -code
    if signum in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
        print(f"dip_jax: {_loss_line(argv, ''.join(native))}", file=sys.stderr, flush=True)
        return 1
    print(f"dip_jax: the trainer was ended by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
    return 128 + signum


def _segments(fd: int):
    """What the trainer writes, cut after each newline or carriage return (a progress bar
    redraws its line with a carriage return and would otherwise show only at the end)."""
    buf = b""
    while True:
        data = os.read(fd, 65536)
        if not data:
            if buf:
                yield buf
            return
        buf += data
        while True:
            cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            yield buf[:cut + 1]
            buf = buf[cut + 1:]


def _loss_line(argv: list[str], native: str) -> str:
    from dip_jax.train.peers import checkpoint_text
    flags = _flags(argv)
    me = flags["process_id"]
    unhealthy = re.search(r"tasks are unhealthy[^:]*:\s*([\d,\s]+)", native)
    if unhealthy:
        what = "lost process " + ", ".join(re.findall(r"\d+", unhealthy.group(1)))
    elif me != 0 and not _reachable(flags["coordinator"]):
        what = "lost process 0 (the coordinator)"
    elif native:
        what = "lost another process"
    else:
        what = "the trainer crashed"
    return (f"{what}: this process was aborted; {checkpoint_text(_workdir(argv))}; "
            f"rerun the same command on every process to resume")


def _reachable(address: str | None) -> bool:
    """Whether the coordinator still accepts connections (unknown address: assume it is gone)."""
    import socket
    if not address or ":" not in address:
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
            return True
    except (OSError, ValueError):
        return False


def _flags(argv: list[str]) -> dict:
    """The multi-process flags of `argv`, the environment's where absent."""
    from dip_jax.config import ConfigError
    try:
        flags = distributed_args(argv)[0]
    except ConfigError:
        flags = {}
    env = os.environ
    pid = env.get("JAX_PROCESS_ID", "")
    return {"process_id": int(pid) if pid.isdigit() else None, "coordinator": env.get("JAX_COORDINATOR_ADDRESS"),
            **flags}


def _workdir(argv: list[str]):
    """The run's workdir as the trainer reads it from the same arguments (None if they do not parse)."""
    import pathlib
    from dip_jax.config import ConfigError
    from dip_jax.config.overrides import apply_overrides, load_config_file, parse_config_args
    try:
        path, workdir, overrides, _ = parse_config_args(argv)
        if workdir is None:
            workdir = f"runs/{apply_overrides(load_config_file(path), overrides).model.name}"
        return pathlib.Path(workdir)
    except (ConfigError, TypeError, OSError):
        return None
