"""The forward checker: a Hugging Face directory loaded through the import path and run in
float32 on named inputs, with outputs named and shaped as transformers returns them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dip_jax.hf.convert import CONFIG_CLASSES, load_params, module_config, open_checkpoint
from dip_jax.hf.safetensors_io import HFError
from dip_jax.models.llm import LLM

BUILD = {"llm": lambda cfg: LLM(cfg, nnx.Rngs(0), jnp.float32)}


def load_module(directory):
    """(family, module config, the module with the checkpoint's parameters)."""
    ckpt, family = open_checkpoint(directory)
    cfg = module_config(CONFIG_CLASSES[family.module](), ckpt, family, f"model.{family.module}")
    abstract = nnx.eval_shape(lambda: BUILD[family.module](cfg))
    graphdef, shapes = nnx.split(abstract)
    params = load_params(ckpt, family, cfg, shapes, put=jax.device_put)
    return family, cfg, nnx.merge(graphdef, params)


def _llm(module, inputs):
    ids = np.asarray(inputs["input_ids"], np.int32)
    b, t = ids.shape
    out = module({"tokens": jnp.asarray(ids), "segment_ids": jnp.ones((b, t), jnp.int32),
                  "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))})
    return {"logits": np.asarray(out[1])}


RUN = {"llm": ("input_ids", _llm)}


def forward(directory, inputs: dict) -> dict:
    family, _, module = load_module(directory)
    key, run = RUN[family.module]
    if key not in inputs:
        raise HFError(f"inputs: {family.model_type} needs {key!r} (got {sorted(inputs)})")
    with jax.default_matmul_precision("highest"):
        return run(module, inputs)
