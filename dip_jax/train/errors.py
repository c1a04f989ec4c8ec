"""How a run ends when it cannot go on: one line for the user and an exit code for the shell."""
from __future__ import annotations


class RunStopped(Exception):
    """The run stopped on purpose (interrupted, diverged, disk full, workdir busy, incompatible
    checkpoint). `str(e)` is the one line to print; the CLI exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
