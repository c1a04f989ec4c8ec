"""Checkpoints that fail: a save that fails stops the run in one line with the previous
checkpoint intact; a checkpoint that does not restore is skipped for the newest one that does.

Wraps `Checkpointer` (same save / restore / close calls), so the trainer does not change when
the checkpoint layout does.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import threading

from dip_jax.train.errors import RunStopped
from dip_jax.train.stray_errors import StrayLoopErrors

LOST_PEER = "lost contact with another process"
_ROOM = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit exceeded"}
_REASONS = {**_ROOM, errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "read-only file system"}
_TEXT = {"no space left": "no space left", "quota exceeded": "disk quota exceeded", "file too large": "file size limit exceeded",
         "permission denied": "permission denied", "read-only file system": "read-only file system",
         # a collective save whose peer is gone: its barriers and exchanges fail like this
         "connection closed by peer": LOST_PEER, "connection reset by peer": LOST_PEER, "gloo": LOST_PEER,
         "barrier": LOST_PEER, "deadline_exceeded": LOST_PEER, "heartbeat": LOST_PEER}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def save_failure_reason(e: BaseException) -> str:
    """What went wrong, in a few words: errno of any OSError in the chain, else the message."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _REASONS:
            return _REASONS[x.errno]
        low = str(x).lower()
        for needle, reason in _TEXT.items():
            if needle in low:
                return reason
        todo += [x.__cause__, x.__context__]
    return _one_line(e)


@contextlib.contextmanager
def _stderr_held():
    """Hold what is written to fd 2 while a save is awaited: a failed write makes tensorstore's
    callbacks print pages of tracebacks from threads no Python hook reaches. Replayed if the
    save succeeded, dropped (the guard prints one line instead) if it failed."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


class CheckpointGuard:
    """`lead`: this process may move unreadable checkpoints aside (process 0)."""

    def __init__(self, ckpt, lead: bool = True):
        self.ckpt, self.lead = ckpt, lead
        self.pending: int | None = None      # a save that may still be writing in the background
        self.last_good: int | None = None
        self.failed = False
        # a background save that fails also dies in its thread, whose default hook prints the
        # whole traceback; the same error is raised again by `wait`, where it becomes one line
        self._hook = threading.excepthook
        threading.excepthook = self._quiet_save_threads
        # a failed write also aborts orbax's event loop while tensorstore still completes its
        # futures from native threads: each tries `loop.call_soon_threadsafe` on the closed loop
        # and the error is printed through sys.excepthook, at any moment until the process ends
        self._sys_hook = sys.excepthook
        sys.excepthook = self._quiet_closed_loop
        # ... and not always through it: those tracebacks are also dropped from sys.stderr
        self._stderr = sys.stderr
        sys.stderr = StrayLoopErrors(sys.stderr)
        logging.getLogger("absl").addFilter(self._quiet_save_logs)

    @staticmethod
    def _quiet_save_logs(record: logging.LogRecord) -> bool:
        """Drop orbax's own error logs (multi-screen tracebacks); the guard reports the failure."""
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)

    def _quiet_closed_loop(self, kind, value, tb) -> None:
        frames, t = [], tb
        while t is not None:
            frames.append(t.tb_frame.f_code.co_filename)
            t = t.tb_next
        stray = (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
                 and frames and all(os.sep + "asyncio" + os.sep in f for f in frames))
        if not stray:
            self._sys_hook(kind, value, tb)

    def _quiet_save_threads(self, args) -> None:
        tb, frames = args.exc_traceback, []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if not any("orbax" in f for f in frames):
            self._hook(args)

    @property
    def directory(self) -> pathlib.Path:
        return self.ckpt.directory

    def latest_step(self) -> int | None:
        return self.ckpt.latest_step()

    # -- saving ----------------------------------------------------------------------------
    def _failure(self, step: int, e: BaseException) -> RunStopped:
        self.failed = True
        kept = f"checkpoint {self.last_good} is intact" if self.last_good is not None else "no earlier checkpoint"
        reason = save_failure_reason(e)
        then = ("rerun the same command to resume once there is room" if reason in _ROOM.values() else
                "rerun the same command to resume once the directory is writable" if reason in _REASONS.values() else
                "rerun the same command to resume")
        return RunStopped(f"checkpoint at step {step} failed: {reason} on {self.directory}; {kept}; {then}", exit_code=1)

    def settle(self) -> None:
        """Wait for a background save; a failure becomes RunStopped naming its step."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        try:
            with _stderr_held():
                self.ckpt.wait()
        except Exception as e:
            raise self._failure(step, e) from None
        self.last_good = step

    def save(self, step: int, state, data_state: dict, force: bool = False, wait: bool = False) -> bool:
        self.settle()
        try:
            saved = self.ckpt.save(step, state, data_state, force=force)
        except Exception as e:
            raise self._failure(step, e) from None
        if saved:
            self.pending = step
        if wait:
            self.settle()
        return saved

    def close(self) -> None:
        try:
            self.settle()
        finally:
            try:
                with _stderr_held():
                    self.ckpt.close()
            except Exception:
                if not self.failed:           # an earlier failure was already reported
                    raise
            finally:
                threading.excepthook = self._hook
                if not self.failed:           # after a failure, stray reports may come until exit
                    sys.excepthook = self._sys_hook
                    sys.stderr.flush()
                    sys.stderr = self._stderr
                logging.getLogger("absl").removeFilter(self._quiet_save_logs)

    # -- restoring -------------------------------------------------------------------------
    def restore(self, state, data_iter):
        """Restore the newest checkpoint that restores cleanly. Newer ones that do not are moved
        to checkpoints/corrupt/ (one line each) once an older one has restored: if none
        restores, the cause is more likely the config than the files, so nothing is moved."""
        bad: list[tuple[int, str]] = []
        for step in reversed(self.ckpt.all_steps()):
            try:
                state, restored = self.ckpt.restore(state, data_iter, step)
            except Exception as e:
                bad.append((step, _one_line(e)))
                continue
            for b, why in bad:
                where = self._move_aside(b)
                print(f"dip_jax: skipped checkpoint {b} (does not restore: {why}); {where}", flush=True)
            self.last_good = restored
            return state, restored
        if bad:
            step, why = bad[0]
            raise RunStopped(f"no checkpoint in {self.directory} restores (newest, {step}: {why}); "
                             f"move the directory away to start over", exit_code=1)
        return state, None

    def _move_aside(self, step: int) -> str:
        if not self.lead:
            return "left in place"
        src = self.directory / str(step)
        dst = self.directory / "corrupt" / str(step)
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / "corrupt" / f"{step}.{n}"
        dst.parent.mkdir(exist_ok=True)
        shutil.move(str(src), str(dst))
        self.ckpt.reload()
        return f"moved to {dst}"
