"""Which processes of a multi-process run are alive.

Each process writes a heartbeat (a counter) into jax's coordination key-value store every
`BEAT_SECONDS`. A process that dies is noticed by its peers at their next collective, which
fails; `lost()` then tells which peer it was: those whose heartbeat does not move over a few
beats and that did not say they were leaving (`leave`, with the reason). A peer that stops
responding while its connections stay open (a frozen host) is noticed by the heartbeat thread
itself: no heartbeat for `timeout_seconds`. Either way `on_lost(processes, how)` is called once.

The store lives in process 0 (the coordinator), so a process that cannot reach it has lost
process 0.
"""
from __future__ import annotations

import threading
import time

BEAT_SECONDS = 1.0
BEATS, LEAVING = "dip_jax/heartbeat/", "dip_jax/leaving/"


def _default_on_lost(processes: list[int], how: str) -> None:
    import os
    import sys
    print(f"dip_jax: lost process {', '.join(map(str, processes))} ({how})", file=sys.stderr, flush=True)
    os._exit(1)


class Heartbeats:
    def __init__(self, client, process: int, processes: int, timeout_seconds: float,
                 beat_seconds: float = BEAT_SECONDS):
        self.client, self.process, self.processes = client, process, processes
        self.timeout, self.beat = timeout_seconds, beat_seconds
        self.on_lost = _default_on_lost          # (processes, how) -> does not return
        self._count = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dip_jax-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def leave(self, reason: str) -> None:
        """Tell the peers this process stops on purpose (they name the reason, not a loss)."""
        try:
            self.client.key_value_set(LEAVING + str(self.process), reason, True)
        except Exception:
            pass

    def lost(self) -> tuple[list[int], dict[int, str]]:
        """After a collective failed: (the peers that stopped, {peer: reason} of those that left).
        Takes a few beats; marks this process as leaving, so peers asking now do not count it."""
        self.leave("")
        try:
            before = self._read(BEATS)
            time.sleep(3 * self.beat)
            after, leaving = self._read(BEATS), self._read(LEAVING)
        except Exception:
            return ([0] if self.process != 0 else []), {}
        left = {p: why for p, why in leaving.items() if p != self.process and why}
        stopped = [p for p in range(self.processes)
                   if p != self.process and p not in leaving and before.get(p) == after.get(p)]
        return stopped, left

    def _beat(self) -> None:
        self._count += 1
        self.client.key_value_set(BEATS + str(self.process), str(self._count), True)

    def _read(self, prefix: str) -> dict[int, str]:
        return {int(k.rstrip("/").rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get(prefix)}

    def _run(self) -> None:
        start = time.monotonic()
        seen = {p: (None, start) for p in range(self.processes) if p != self.process}   # value, when it moved
        next_check = start
        while not self._stopped.wait(self.beat):
            try:
                self._beat()
                now = time.monotonic()
                if now < next_check:
                    continue
                next_check = now + self.timeout / 4
                beats, leaving = self._read(BEATS), self._read(LEAVING)
            except Exception:
                if self._stopped.is_set():
                    return
                if self.process != 0:
                    self.on_lost([0], "the coordinator cannot be reached")
                return
            for p in seen:
                if beats.get(p) != seen[p][0]:
                    seen[p] = (beats.get(p), now)
            silent = [p for p, (_, moved) in seen.items() if now - moved > self.timeout and p not in leaving]
            if silent:
                self.on_lost(silent, f"no heartbeat for {self.timeout:g} s")
                return
