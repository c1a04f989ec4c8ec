"""pipeline.xla_flags: what the CLI appends to XLA_FLAGS before jax starts.

auto changes nothing on a CPU host; on a GPU it adds the command-buffer types (with loops,
conditionals and collectives) and the latency-hiding scheduler, leaving flags the user set
alone. The installed XLA accepts every flag of the GPU string (it parses xla_gpu_* flags on
any backend and rejects an unknown command-buffer type).
"""
import os
import subprocess
import sys

import pytest

from dip_jax.config import ConfigError, TrainConfig
from dip_jax.config.overrides import apply_overrides
from dip_jax.train import xla_flags as X

GPU = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,"
       "CONDITIONAL,COLLECTIVES --xla_gpu_enable_latency_hiding_scheduler=true")


def test_auto_on_a_cpu_host_changes_nothing():
    for env in ({"JAX_PLATFORMS": "cpu"}, {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_foo=1"},
                {"CUDA_VISIBLE_DEVICES": "-1"}):
        before = dict(env)
        assert X.apply("auto", env) is None and env == before
    assert not X.gpu_expected({}, device_files=False, plugin=True)
    assert not X.gpu_expected({}, device_files=True, plugin=False)      # no CUDA jax installed
    assert X.apply("none", {"JAX_PLATFORMS": "cuda"}) is None


def test_gpu_detection_without_jax():
    assert X.gpu_expected({"JAX_PLATFORMS": "cuda"})
    assert X.gpu_expected({"JAX_PLATFORMS": "cuda,cpu"})
    assert not X.gpu_expected({"JAX_PLATFORMS": "cpu"}, device_files=True, plugin=True)
    assert not X.gpu_expected({"CUDA_VISIBLE_DEVICES": ""}, device_files=True, plugin=True)
    assert X.gpu_expected({"CUDA_VISIBLE_DEVICES": "0,1"}, device_files=True, plugin=True)


def test_the_gpu_flag_string():
    assert " ".join(X.flags_for("auto", gpu=True)) == GPU
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/d"}
    got = X.apply("auto", env)
    # the user's own setting of a flag wins; the others are appended after theirs
    assert got == env["XLA_FLAGS"] == ("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/d "
                                       + GPU.split()[0])
    assert X.apply("auto", env) is None          # applied twice (supervisor, then child): no duplicates


def test_an_explicit_string_applies_on_any_backend():
    env = {"JAX_PLATFORMS": "cpu"}
    assert X.apply("--xla_cpu_enable_fast_math=false", env) == "--xla_cpu_enable_fast_math=false"


def test_config_key_is_checked():
    assert TrainConfig().pipeline.xla_flags == "auto"
    with pytest.raises(ConfigError, match=r"^pipeline.xla_flags: auto, none, or flags"):
        apply_overrides(TrainConfig(), ["pipeline.xla_flags=fast"])


def test_the_installed_xla_parses_the_gpu_flags():
    env = {**os.environ, "XLA_FLAGS": GPU, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "3.0", run.stderr[-2000:]
    bad = {**env, "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,NOT_A_TYPE"}
    run = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(3).sum()"],
                         env=bad, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "NOT_A_TYPE" in run.stderr
