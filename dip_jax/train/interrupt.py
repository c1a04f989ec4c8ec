"""SIGTERM / SIGINT: the first one lets the current step finish, then the trainer checkpoints and
stops with exit code 128 + signal; a second one exits at once.

Preemption (SLURM, Kubernetes, spot instances) sends SIGTERM and waits a grace period, so the
first signal only sets a flag that the step loop reads between steps: a signal never unwinds
the stack from inside a jax call.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupts:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # a second signal means "now": no checkpoint, but no orphaned planner processes either
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(128 + signum)


def ignore_interrupts() -> None:
    """For helper processes (planner workers): the terminal's Ctrl-C reaches the whole process
    group, and the trainer, not each helper, decides what happens."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
