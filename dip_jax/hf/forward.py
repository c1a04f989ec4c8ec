"""The forward checker: a Hugging Face directory loaded through the import path and run in
float32 on named inputs, with outputs named and shaped as transformers returns them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dip_jax.hf.convert import CONFIG_CLASSES, load_params, module_config, open_checkpoint
from dip_jax.hf.safetensors_io import HFError
from dip_jax.models.audio import AudioEncoder
from dip_jax.models.llm import LLM
from dip_jax.models.vit import ViT

BUILD = {"llm": lambda cfg: LLM(cfg, nnx.Rngs(0), jnp.float32),
         "vision": lambda cfg: ViT(cfg, cfg.dim, nnx.Rngs(0), jnp.float32),
         "audio": lambda cfg: AudioEncoder(cfg, cfg.dim, nnx.Rngs(0), jnp.float32)}
# what the checker builds beyond the checkpoint's keys: no spatial merge (its projector is unused)
CHECKER = {"vision": {"spatial_merge": 1}}


def load_module(directory):
    """(family, module config, the module with the checkpoint's parameters)."""
    ckpt, family = open_checkpoint(directory)
    base = CONFIG_CLASSES[family.module](**CHECKER.get(family.module, {}))
    cfg = module_config(base, ckpt, family, f"model.{family.module}")
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


def _tower(module, inputs):
    """pixel_values [B, C, H, W] -> last_hidden_state [B, N, D]."""
    images = jnp.asarray(np.asarray(inputs["pixel_values"], np.float32).transpose(0, 2, 3, 1))
    x = module.run_blocks(module.layer_params(), module.embed(images), None)
    return {"last_hidden_state": np.asarray(module.features(x))}


def _audio(module, inputs):
    """input_features [B, n_mels, frames] -> last_hidden_state [B, frames / 2, D]."""
    frames = jnp.asarray(np.asarray(inputs["input_features"], np.float32).transpose(0, 2, 1))
    x = module.run_blocks(module.layer_params(), module.embed(frames), None)
    return {"last_hidden_state": np.asarray(module.features(x))}


RUN = {"llm": ("input_ids", _llm), "vision": ("pixel_values", _tower), "audio": ("input_features", _audio)}


def forward(directory, inputs: dict) -> dict:
    family, _, module = load_module(directory)
    key, run = RUN[family.module]
    if key not in inputs:
        raise HFError(f"inputs: {family.model_type} needs {key!r} (got {sorted(inputs)})")
    with jax.default_matmul_precision("highest"):
        return run(module, inputs)
