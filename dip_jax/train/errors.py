"""How a run ends when it cannot go on: one line for the user and an exit code for the shell."""
from __future__ import annotations


class RunStopped(Exception):
    """The run stopped on purpose (interrupted, diverged, disk full, workdir busy, incompatible
    checkpoint). `str(e)` is the one line to print; the CLI exits with `exit_code`. `everywhere`:
    every process of a multi-process run stops here, at the same step (they then leave together;
    otherwise the others find this one gone and stop naming its reason)."""

    def __init__(self, message: str, exit_code: int = 1, everywhere: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.everywhere = everywhere
