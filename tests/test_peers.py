"""The pieces behind a multi-process run's failure handling, without processes: heartbeats that
find a silent or vanished peer, the supervisor's reading of a native abort, the reasons a
checkpoint write failed, the host's view of skipped updates and zero gradients."""
import errno
import pathlib
import threading
import time

import pytest

from dip_jax.runtime.heartbeat import BEATS, LEAVING, Heartbeats
from dip_jax.train import supervise
from dip_jax.train.checkpoint_guard import LOST_PEER, CheckpointGuard, save_failure_reason
from dip_jax.train.errors import RunStopped
from dip_jax.train.peers import PeerLoss, last_complete_checkpoint


class Store:
    """jax's coordination key-value store as the heartbeats use it; `down` makes it unreachable."""

    def __init__(self):
        self.kv, self.down, self.lock = {}, False, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")
        with self.lock:
            self.kv[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")
        with self.lock:
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watch(store, process, processes, timeout=0.6, beat=0.05):
    reports = []
    hb = Heartbeats(store, process, processes, timeout, beat)
    hb.on_lost = lambda lost, how: reports.append((lost, how))
    return hb, reports


def _until(cond, seconds=5.0):
    t0 = time.time()
    while not cond() and time.time() - t0 < seconds:
        time.sleep(0.02)
    return cond()


def test_a_silent_peer_is_lost_after_the_timeout_and_not_before():
    store = Store()
    peers = [_watch(store, p, 3, timeout=1.5)[0] for p in (1, 2)]
    hb, reports = _watch(store, 0, 3, timeout=1.5)
    for h in (hb, *peers):
        h.start()
    time.sleep(2.5)
    assert reports == []                              # everyone beats: nobody is lost, past the timeout
    peers[1].stop()                                   # process 2 falls silent
    t0 = time.time()
    assert _until(lambda: reports, 10.0), "a silent peer was never reported"
    assert reports[0][0] == [2] and "no heartbeat for 1.5 s" in reports[0][1]
    assert time.time() - t0 >= 1.4
    for h in (hb, peers[0]):
        h.stop()


def test_after_a_failed_collective_lost_names_the_stopped_peer_not_the_leaving_one():
    store = Store()
    alive, stopped, leaving = (_watch(store, p, 4)[0] for p in (1, 2, 3))
    me, _ = _watch(store, 0, 4, beat=0.4)             # samples 1.2 s apart: the live peer beats many times
    for h in (me, alive, stopped, leaving):
        h.start()
    time.sleep(0.2)
    stopped.stop()
    stopped._thread.join()                            # its last beat is written before the first sample
    leaving.leave("checkpoint at step 6 failed: no space left")
    leaving.stop()
    lost, left = me.lost()
    assert lost == [2] and left == {3: "checkpoint at step 6 failed: no space left"}
    assert store.kv[LEAVING + "0"] == ""               # peers asking now do not count this process
    for h in (me, alive):
        h.stop()


def test_an_unreachable_store_means_the_coordinator_is_lost():
    store = Store()
    hb, reports = _watch(store, 1, 2)
    hb.start()
    store.down = True
    assert _until(lambda: reports)
    assert reports[0][0] == [0] and "coordinator" in reports[0][1]
    assert hb.lost() == ([0], {})
    # process 0 is the coordinator: its own store failing names nobody
    assert Heartbeats(Store(), 0, 2, 1.0, 0.05).lost()[0] == [1]     # a peer that never beat is lost
    down = Store()
    down.down = True
    assert Heartbeats(down, 0, 2, 1.0).lost() == ([], {})


def test_beats_are_written_under_the_process_id():
    store = Store()
    hb = Heartbeats(store, 3, 4, 10.0, 0.05)
    hb.start()
    assert _until(lambda: int(store.kv.get(BEATS + "3", 0)) >= 3)
    hb.stop()


def test_peer_loss_line_names_process_step_and_last_complete_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    for name in ("4", "6", "8.orbax-checkpoint-tmp-17", "corrupt"):
        (ck / name).mkdir(parents=True)
    assert last_complete_checkpoint(ck) == 6
    peers = PeerLoss(tmp_path)
    peers.step = 9
    assert peers.line([1], "its connection closed") == (
        f"lost process 1 at step 9 (its connection closed); the last complete checkpoint is step 6 in {ck}; "
        "rerun the same command on every process to resume")
    assert peers.line([], "", {2: "checkpoint at step 8 failed: no space left"}).startswith(
        "process 2 stopped at step 9 (checkpoint at step 8 failed: no space left); the last complete")
    assert "no checkpoint is complete yet" in PeerLoss(tmp_path / "none").line([0], "x")


NATIVE = """E1204 01:37:13.644234    8836 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1204 01:37:13.644238    8836 client.h:80] Terminating process because the JAX distributed service detected fatal errors.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_message:"recvmsg:Connection reset by peer", grpc_status:14}
*** Check failure stack trace: ***
    @     0x7f63e4b9a82e  std::_Function_handler<>::_M_invoke()
dip_jax: something of ours
"""


def test_supervisor_drops_native_reports_and_names_the_lost_process(tmp_path):
    kept = [l for l in NATIVE.splitlines() if not supervise._NATIVE.search(l)]
    assert "dip_jax: something of ours" in kept and not any(l.startswith(("E1204", "F1204", "***")) for l in kept)
    assert supervise._OURS.match("dip_jax: something of ours") and not supervise._OURS.match(":UNKNOWN:Error")
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    argv = ["--config", "configs/tiny_cpu.py", f"--workdir={tmp_path}", "--process-id", "1",
            "--coordinator", "127.0.0.1:1"]                # nothing listens there: the coordinator is gone
    line = supervise._loss_line(argv, NATIVE)
    assert line.startswith("lost process 0 (the coordinator)") and "the last complete checkpoint is step 10" in line
    unhealthy = "E1204 ...] The following tasks are unhealthy (stopped sending heartbeats):\n2\nThe tasks have crashed."
    assert supervise._loss_line(["--process-id=0"], unhealthy).startswith("lost process 2:")
    assert supervise._loss_line(["--process-id=0"], "").startswith("the trainer crashed: this process was aborted")
    assert supervise.wanted(["--config", "x.py", "--coordinator", "h:1"]) and not supervise.wanted(["--config", "x.py"])


@pytest.mark.parametrize("error,reason,room", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left", True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded", True),
    (OSError(errno.EACCES, "Permission denied"), "permission denied", False),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system", False),
    (RuntimeError("UNKNOWN: Gloo AllGather failed: pair.cc:547] Connection closed by peer"), LOST_PEER, False),
    (ValueError("something else entirely"), "ValueError: something else entirely", False)])
def test_checkpoint_failures_name_their_cause_and_only_a_full_disk_asks_for_room(tmp_path, error, reason, room):
    assert save_failure_reason(error) == reason
    guard = CheckpointGuard.__new__(CheckpointGuard)
    guard.ckpt, guard.last_good, guard.failed = type("C", (), {"directory": pathlib.Path(tmp_path)})(), 4, False
    stop = guard._failure(6, error)
    assert isinstance(stop, RunStopped) and str(stop).startswith(f"checkpoint at step 6 failed: {reason} on ")
    assert ("once there is room" in str(stop)) == room and "checkpoint 4 is intact" in str(stop)


def test_skipped_updates_count_as_nonfinite_and_zero_gradients_warn_once(capsys):
    from dip_jax.config import TrainSection
    from dip_jax.train.nonfinite import NonfiniteMonitor
    mon = NonfiniteMonitor(TrainSection(max_nonfinite_steps=3))
    assert mon.observe(1, {"loss": 2.0, "grad_norm": 1.0, "update_skipped": 0.0})
    for step in (2, 3):
        assert not mon.observe(step, {"loss": 2.0, "grad_norm": 1.0, "update_skipped": 1.0})
        mon.check_stop(1)
    assert "step 2: non-finite update (loss 2, grad_norm 1), update skipped" in capsys.readouterr().out
    assert not mon.observe(4, {"loss": 2.0, "grad_norm": 1.0, "update_skipped": 1.0})
    with pytest.raises(RunStopped, match=r"stopped: update not finite at steps 2-4 \(3 in a row") as stop:
        mon.check_stop(1)
    assert stop.value.everywhere and stop.value.exit_code == 1
    mon = NonfiniteMonitor(TrainSection(max_nonfinite_steps=3))
    for step in range(1, 8):
        assert mon.observe(step, {"loss": 1.0, "grad_norm": 0.0, "update_skipped": 0.0})
    out = capsys.readouterr().out
    assert out.count("gradient norm is exactly 0 for 3 steps in a row (to step 3)") == 1, out


def test_the_optimizer_reports_the_update_it_skipped():
    import jax.numpy as jnp
    import optax
    from dip_jax.runtime.update import guarded_update
    from dip_jax.train.nonfinite import skip_nonfinite
    params = {"w": jnp.ones(3)}
    tx = skip_nonfinite(optax.sgd(1e30))
    state = tx.init(params)
    grads = {"w": jnp.full(3, 1e10)}                  # finite, but times 1e30 overflows float32
    updates, new_state, skipped = guarded_update(tx, grads, state, params)
    assert bool(skipped) and float(jnp.abs(updates["w"]).max()) == 0.0
    _, _, skipped = guarded_update(tx, {"w": jnp.full(3, 1e-20)}, state, params)
    assert not bool(skipped)
    _, _, skipped = guarded_update(optax.sgd(1e30), grads, optax.sgd(1e30).init(params), params)
    assert not bool(skipped)                          # a plain transformation never skips


def test_the_supervisor_imports_no_jax():
    """It only forwards signals and reads its child's stderr: it must never hold an accelerator."""
    import subprocess
    import sys
    code = ("import sys, dip_jax.train.supervise, dip_jax.train.peers; "
            "bad = [m for m in ('jax', 'flax', 'optax', 'grain', 'orbax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_supervisor_passes_progress_redraws_at_once():
    import os
    read, write = os.pipe()
    os.write(write, b"train: 10%\rtrain: 20%\rdip_jax: done\ntail")
    os.close(write)
    assert list(supervise._segments(read)) == [b"train: 10%\r", b"train: 20%\r", b"dip_jax: done\n", b"tail"]


def test_stray_closed_loop_tracebacks_are_dropped_whole_and_nothing_else():
    import io
    from dip_jax.train.stray_errors import StrayLoopErrors
    stray = ('Traceback (most recent call last):\n  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in '
             'call_soon_threadsafe\n    self._check_closed()\nRuntimeError: Event loop is closed\n')
    real = 'Traceback (most recent call last):\n  File "/x/dip_jax/train/a.py", line 3, in f\nValueError: real\n'
    out = io.StringIO()
    f = StrayLoopErrors(out)
    for piece in ("train: 10%\r", "Trace", stray[5:40], stray[40:], "dip_jax: one line\n", real[:50], real[50:]):
        f.write(piece)                                # in pieces, as tracebacks are printed
    assert out.getvalue() == "train: 10%\rdip_jax: one line\n" + real
    f.write("train: 20%\r")
    assert out.getvalue().endswith("train: 20%\r")    # a progress redraw passes at once
