"""sys.stderr less the "Event loop is closed" tracebacks that a failed checkpoint write leaves.

After a write fails, orbax's event loop is closed while tensorstore still completes its futures
from native threads; each completion prints a whole traceback of `call_soon_threadsafe` on the
closed loop, at any moment until the process ends, and not always through sys.excepthook. They
are dropped here as whole blocks, so none can leave a stray "Traceback" header behind, while
every other text (a real traceback included) passes through, a progress bar's redraws at once.
"""
from __future__ import annotations

import os
import threading

HEADER = "Traceback (most recent call last):"
_STRAY = "RuntimeError: Event loop is closed"


class StrayLoopErrors:
    def __init__(self, inner):
        self.inner = inner
        self._pending = ""
        self._block: list[str] | None = None        # lines of a traceback being read
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            self._drain()
        return len(text)

    def _drain(self) -> None:
        while True:
            if self._block is None:
                at = self._pending.find(HEADER)
                if at < 0:
                    # pass all on but a tail that may be the start of a header
                    keep = next((n for n in range(min(len(HEADER), len(self._pending)), 0, -1)
                                 if HEADER.startswith(self._pending[-n:])), 0)
                    cut = len(self._pending) - keep
                    if cut:
                        self.inner.write(self._pending[:cut])
                    self._pending = self._pending[cut:]
                    return
                if at:
                    self.inner.write(self._pending[:at])
                self._pending, self._block = self._pending[at:], []
            end = self._pending.find("\n")
            if end < 0:
                return
            line, self._pending = self._pending[:end + 1], self._pending[end + 1:]
            self._block.append(line)
            if len(self._block) > 1 and not line.startswith((" ", "\t")):     # the exception's own line
                block, self._block = self._block, None
                frames = [l for l in block if l.lstrip().startswith("File ")]
                stray = line.strip() == _STRAY and frames and all(
                    f"{os.sep}asyncio{os.sep}" in l for l in frames)
                if not stray:
                    self.inner.write("".join(block))

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name):
        return getattr(self.inner, name)
