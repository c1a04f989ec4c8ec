import os

# Before jax initialises: 8 fake CPU devices, like the CLI on a host without an accelerator.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
    return ROOT


def run_cli(*args, timeout=600, env=None):
    import subprocess
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop("JAX_NUM_CPU_DEVICES", None)   # the CLI must set up its own devices
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> pathlib.Path:
    """One persistent XLA compilation cache for every training run of the session."""
    return tmp_path_factory.mktemp("xla")
