"""Typed, frozen configuration. Defaults live here and only here.

A config file in ``configs/`` is a Python module whose ``get_config()`` returns a
``TrainConfig`` built from these dataclasses with the deltas it needs. The package is pure
Python (no jax), so the planner can read configs and the analytic parameter counts:
`model.py` holds the model configs, `run.py` the run sections, `train_config.py` their
composition and the checks across sections, `overrides.py` config files and the strict
command-line overrides, `zoo.py` the paper's models as config values.
"""
from dip_jax.config.checks import ConfigError, deferred_checks
from dip_jax.config.model import (MODULES, AudioConfig, BlockConfig, DiTConfig, LLMConfig, ModelConfig,
                                  VisionConfig, attention_params, projector_params, swiglu_params)
from dip_jax.config.run import (BASELINES, HARDWARE_PROFILES, MEMORY_STRATEGIES, ON_NONFINITE, REMATS, OVERSIZE,
                                SCHEDULERS, SCHEDULES, CheckpointConfig, DataConfig, DistributedConfig, MeshConfig, OptimConfig,
                                PipelineConfig, TrainSection)
from dip_jax.config.train_config import TrainConfig, with_overrides

__all__ = ["MODULES", "BASELINES", "HARDWARE_PROFILES", "MEMORY_STRATEGIES", "ON_NONFINITE", "REMATS", "OVERSIZE",
           "SCHEDULERS", "SCHEDULES", "ConfigError", "deferred_checks", "AudioConfig", "BlockConfig",
           "DiTConfig", "LLMConfig", "ModelConfig", "VisionConfig", "attention_params", "projector_params",
           "swiglu_params", "CheckpointConfig", "DataConfig", "DistributedConfig", "MeshConfig", "OptimConfig", "PipelineConfig",
           "TrainSection", "TrainConfig", "with_overrides"]
