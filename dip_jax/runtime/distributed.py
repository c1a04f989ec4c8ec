"""Several processes, one program: `jax.distributed` set-up and broadcasting plans from process 0.

Every process must run the same compiled program with the same tables (a mismatch hangs in the
first collective), so only process 0 plans and the others receive its plans, as JSON: the broadcast carries a
plain JSON-serialisable payload and knows nothing of what it holds.
"""
from __future__ import annotations

import atexit
import json
import os

import numpy as np

from dip_jax.config import ConfigError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, timeout_seconds: float = 120.0) -> bool:
    """Start `jax.distributed` from arguments or the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); `auto` lets jax detect a cluster (SLURM, Open MPI, TPU
    pods, Kubernetes). Returns whether a multi-process run was started. Call before jax is used.

    `timeout_seconds`: a peer whose heartbeat stops for this long is lost (`heartbeat.py`); the
    closing barrier waits at most this long, and jax's own heartbeat timeout is twice it, so
    that the run's own check, which ends the job in one line, comes first."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
    if coordinator is None and num_processes is None and not auto:
        return False
    if not auto and (coordinator is None or num_processes is None or process_id is None):
        raise ConfigError("distributed: --coordinator, --num-processes and --process-id go together "
                          f"(got {coordinator!r}, {num_processes!r}, {process_id!r})")
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices' collectives across processes
    # preemption is the trainer's: a signal to any process stops every process at one step
    # (train/interrupt.py), so jax's own SIGTERM listener would only take the signal from it
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=max(1, int(2 * timeout_seconds)),
                               shutdown_timeout_seconds=max(1, int(timeout_seconds)))
    from dip_jax.runtime.heartbeat import Heartbeats
    global HEARTBEATS
    HEARTBEATS = Heartbeats(coordination_client(), jax.process_index(), jax.process_count(), timeout_seconds)
    HEARTBEATS.start()
    atexit.register(HEARTBEATS.stop)     # registered after jax's own shutdown, so it runs before it
    return True


HEARTBEATS = None          # the running Heartbeats of a multi-process run


def coordination_client():
    """jax's client of the coordination service (its key-value store carries the heartbeats)."""
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def gather_ints(value: int) -> list[int]:
    """Every process's `value`, in process order (a collective: every process must call it)."""
    import jax
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)]


def gather_int_rows(values) -> list[list[int]]:
    """Every process's list of ints (all of one length), in process order: one collective."""
    import jax
    if jax.process_count() == 1:
        return [[int(v) for v in values]]
    from jax.experimental import multihost_utils
    got = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32))).reshape(jax.process_count(), -1)
    return [[int(v) for v in row] for row in got]


def finish() -> None:
    """End a multi-process run that every process ends together: the heartbeats stop and jax's
    closing barrier lets the coordinator's process go last, so no process sees it vanish."""
    import jax
    if HEARTBEATS is not None:
        HEARTBEATS.stop()
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {v!r}") from None


HEADER_BYTES = 8          # the payload length, little-endian, in a fixed-size first broadcast


def broadcast_json(value):
    """Process 0's JSON-serialisable `value` on every process. Only JSON text crosses the
    network, so no process ever runs a deserialiser that can build arbitrary objects from what
    another process sent. Payloads are padded to powers of two so that only a few broadcast
    programs compile. A no-op with one process."""
    import jax
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    lead = jax.process_index() == 0
    payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if lead else np.zeros(0, np.uint8)
    header = np.frombuffer(int(payload.size).to_bytes(HEADER_BYTES, "little"), np.uint8).copy()
    header = np.asarray(multihost_utils.broadcast_one_to_all(header), np.uint8)
    size = int.from_bytes(header.tobytes(), "little")
    buf = np.zeros(1 << max(10, (size - 1).bit_length()), np.uint8)
    buf[:payload.size] = payload
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return value if lead else json.loads(buf[:size].tobytes().decode())

