"""A lost process ends the job: every other process stops with one line that names it, the last
complete checkpoint and the rerun command (exit code 1), instead of waiting in a collective
that cannot finish or being aborted when jax's coordination service gives up on it.

A process is found lost by its heartbeat (`runtime/heartbeat.py`): at once after a collective
failed, or when it has sent none for `distributed.timeout_seconds`.
"""
from __future__ import annotations

import pathlib
import sys
import threading

from dip_jax.train.interrupt import exit_now


def last_complete_checkpoint(directory: pathlib.Path | None) -> int | None:
    """The newest step directory in `directory`: a save is written under a temporary name and
    renamed to its step only once every process has finished it."""
    if directory is None or not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, default=None)


def checkpoint_text(workdir: pathlib.Path | None) -> str:
    step = last_complete_checkpoint(workdir / "checkpoints" if workdir is not None else None)
    if step is None:
        return "no checkpoint is complete yet"
    return f"the last complete checkpoint is step {step} in {workdir / 'checkpoints'}"


class PeerLoss:
    """What this process does when another one is lost; `step` is kept current by the trainer."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.step: int | None = None
        self._lock = threading.Lock()

    def line(self, processes: list[int], how: str, left: dict[int, str] | None = None) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if processes:
            what = f"lost process {', '.join(map(str, processes))}{at} ({how})"
        else:
            what = "; ".join(f"process {p} stopped{at} ({why})" for p, why in sorted((left or {}).items()))
        return f"{what}; {checkpoint_text(self.workdir)}; rerun the same command on every process to resume"

    def __call__(self, processes: list[int], how: str, left: dict[int, str] | None = None) -> None:
        """Print the line and end this process (from any thread; only the first report counts)."""
        if not self._lock.acquire(blocking=False):
            threading.Event().wait()            # another thread is ending the process
        print(f"dip_jax: {self.line(processes, how, left)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        exit_now(1)

    def after_failure(self, heartbeats, error: BaseException) -> None:
        """After an exception in the step loop: end the process if a peer is lost or has left;
        return (the caller re-raises) if every peer is alive, the error then being this one's."""
        lost, left = heartbeats.lost()
        if lost or left:
            self(lost, _how(error), left)


def _how(error: BaseException) -> str:
    text = str(error).lower()
    if "closed" in text or "reset" in text or "broken pipe" in text:
        return "its connection closed"
    if "timed out" in text or "deadline" in text:
        return "a collective timed out"
    return "it stopped"
