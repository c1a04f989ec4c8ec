"""SIGTERM / SIGINT: the first one lets the current step finish, then the trainer checkpoints and
stops with exit code 128 + signal; a second one exits at once.

Preemption (SLURM, Kubernetes, spot instances) sends SIGTERM and waits a grace period, so the
first signal only sets a flag that the step loop reads between steps: a signal never unwinds
the stack from inside a jax call. In a multi-process run the processes agree at every step
whether any of them was signalled (`agree`), so they all stop after the same step and write one
checkpoint together. There each process's signals come from its supervisor
(`train/supervise.py`) through a pipe, and signals sent to the trainer itself are ignored: a
scheduler that signals every process of the job reaches both, and a signal must count once.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_FD = "DIP_JAX_SIGNAL_FD"        # environment: the pipe a supervised trainer's signals come through
_ACTIVE: list["Interrupts"] = []


class Interrupts:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        _ACTIVE.append(self)
        if os.environ.get(SIGNAL_FD):
            return self                        # the supervisor's pipe delivers them
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def agree(self, gather) -> tuple[int, list[int]] | None:
        """(the first signal, the processes signalled) if any process was; `gather` maps this
        process's value to every process's, in process order (a collective)."""
        signals = gather(self.signum or 0)
        signalled = [process for process, signum in enumerate(signals) if signum]
        return (signals[signalled[0]], signalled) if signalled else None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # a second signal means "now": no checkpoint, but no orphaned planner processes either
        exit_now(128 + signum)


def ignore_interrupts() -> None:
    """For helper processes (planner workers): the terminal's Ctrl-C reaches the whole process
    group, and the trainer, not each helper, decides what happens."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def listen_to_supervisor() -> None:
    """In a supervised trainer: signals sent to this process are ignored, and each byte the
    supervisor writes to the pipe is one signal. Before training has started a signal ends the
    process at once; if the supervisor is gone (killed), so is this process."""
    fd = int(os.environ[SIGNAL_FD])
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    def listen() -> None:
        while True:
            data = os.read(fd, 1)
            if not data:                       # the supervisor died: nothing may outlive it
                exit_now(128 + signal.SIGKILL)
            if _ACTIVE:
                _ACTIVE[-1]._handle(data[0], None)
            else:
                import sys
                print("dip_jax: interrupted before training started", file=sys.stderr, flush=True)
                exit_now(128 + data[0])

    threading.Thread(target=listen, name="dip_jax-signals", daemon=True).start()


def exit_now(code: int) -> None:
    """End the process at once, planner workers first (they would outlive it)."""
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(code)
