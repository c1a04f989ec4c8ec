"""dip_jax: multimodal model training with pipeline schedules re-planned for every batch.

Importing the package imports no jax: the planner (`dip_jax.plan`) must run without it.
Public names are loaded lazily on first access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "dip_jax.config",
    "ModelConfig": "dip_jax.config",
    "SampleMeta": "dip_jax.data.metadata",
    "LMM": "dip_jax.models.lmm",
    "build_model": "dip_jax.models.lmm",
    "run": "dip_jax.train.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dip_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
