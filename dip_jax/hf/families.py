"""One table per Hugging Face family: its config.json -> the module's config keys, and each
parameter of the dip_jax module -> the checkpoint tensor it is (and back, for export).

A table maps a parameter's path inside the module (block parameters under 'blocks', one
tensor per layer, `{i}` in the name) to (tensor name, kind): 'linear' tensors are stored
[out, in] by torch and are [in, out] kernels here; 'as_is' tensors are the same array.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dip_jax.hf.safetensors_io import HFError

# patch: a conv kernel [D, C, p, p] (a linear over patches here); conv1d: [out, in, k] ([k, in, out] here)
LINEAR, AS_IS, PATCH, CONV1D = "linear", "as_is", "patch", "conv1d"


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    module: str                                   # the dip_jax module it initialises
    arch: Callable[[dict, str], dict]             # config.json, its path -> module config keys
    names: Callable[[object], dict]               # module config -> {path: (tensor name, kind)}
    to_json: Callable[[object, dict], dict] | None  # module config, a base config.json -> config.json
    architecture: str = ""                        # transformers class for `architectures`
    # checkpoint tensors the module does not use, by name and module config (a pooling head,
    # the layers past the feature layer)
    unused: Callable[[str, object], bool] = lambda name, cfg: False
    prefixes: tuple[str, ...] = ("",)             # where a composite model keeps this part


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise HFError(f"{where}: key {key!r} is missing")
    return cfg[key]


def _rope(cfg: dict) -> tuple[float, tuple]:
    """(theta, scaling pairs): transformers 5 writes rope_parameters, earlier versions
    rope_theta + rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = params or dict(cfg.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, ()
    return theta, tuple(sorted(scaling.items()))


def _decoder_arch(family: str) -> Callable[[dict, str], dict]:
    def arch(cfg: dict, where: str) -> dict:
        heads = int(_need(cfg, "num_attention_heads", where))
        dim = int(_need(cfg, "hidden_size", where))
        if cfg.get("head_dim") not in (None, dim // heads):
            raise HFError(f"{where}: head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads="
                          f"{dim // heads}; not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise HFError(f"{where}: hidden_act={cfg['hidden_act']!r} not supported for {family} (silu)")
        if cfg.get("use_sliding_window"):
            raise HFError(f"{where}: use_sliding_window=true not supported")
        theta, scaling = _rope(cfg)
        biased = bool(cfg.get("attention_bias", False))
        return {
            "layers": int(_need(cfg, "num_hidden_layers", where)), "dim": dim,
            "mlp_hidden": int(_need(cfg, "intermediate_size", where)), "heads": heads,
            "kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "vocab_size": int(_need(cfg, "vocab_size", where)), "rope_theta": theta, "rope_scaling": scaling,
            "norm": "rms", "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "mlp": "swiglu",
            "qkv_bias": True if family == "qwen2" else biased, "out_bias": False if family == "qwen2" else biased,
            "mlp_bias": bool(cfg.get("mlp_bias", False)) if family == "llama" else False,
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        }
    return arch


def _decoder_names(cfg) -> dict:
    t = {("embedding", "embedding"): ("model.embed_tokens.weight", AS_IS),
         ("norm", "scale"): ("model.norm.weight", AS_IS)}
    if not cfg.tie_embeddings:
        t[("lm_head", "kernel")] = ("lm_head.weight", LINEAR)
    layer = "model.layers.{i}."
    t[("blocks", "attn_norm", "scale")] = (layer + "input_layernorm.weight", AS_IS)
    t[("blocks", "mlp_norm", "scale")] = (layer + "post_attention_layernorm.weight", AS_IS)
    for p in "qkvo":
        t[("blocks", "attn", p, "kernel")] = (layer + f"self_attn.{p}_proj.weight", LINEAR)
        if cfg.out_bias if p == "o" else cfg.qkv_bias:
            t[("blocks", "attn", p, "bias")] = (layer + f"self_attn.{p}_proj.bias", AS_IS)
    for p in ("gate", "up", "down"):
        t[("blocks", "mlp", p, "kernel")] = (layer + f"mlp.{p}_proj.weight", LINEAR)
        if cfg.mlp_bias:
            t[("blocks", "mlp", p, "bias")] = (layer + f"mlp.{p}_proj.bias", AS_IS)
    return t


def _decoder_json(model_type: str, architecture: str) -> Callable[[object, dict], dict]:
    def to_json(cfg, base: dict) -> dict:
        if model_type == "qwen2" and (cfg.out_bias or cfg.mlp_bias or not cfg.qkv_bias):
            raise HFError(f"model.llm: qwen2 has q/k/v biases only (qkv_bias={cfg.qkv_bias}, "
                          f"out_bias={cfg.out_bias}, mlp_bias={cfg.mlp_bias})")
        if model_type == "llama" and cfg.qkv_bias != cfg.out_bias:
            raise HFError(f"model.llm: llama's attention_bias covers q/k/v and o alike "
                          f"(qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias})")
        if cfg.norm != "rms" or cfg.mlp != "swiglu":
            raise HFError(f"model.llm: {model_type} needs norm='rms', mlp='swiglu' (got {cfg.norm!r}, {cfg.mlp!r})")
        out = {k: v for k, v in base.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else {"rope_type": "default"}
        rope = {"rope_theta": cfg.rope_theta, **scaling}
        out.update({
            "model_type": model_type, "architectures": [architecture], "hidden_size": cfg.dim,
            "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope, "dtype": "float32"})
        out.setdefault("max_position_embeddings", 4096)
        if model_type == "llama":
            out.update({"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias})
        else:
            out.pop("layer_types", None)
        return out
    return to_json


_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def _tower_arch(family: str) -> Callable[[dict, str], dict]:
    def arch(cfg: dict, where: str) -> dict:
        cfg = cfg.get("vision_config", cfg)
        act = cfg.get("hidden_act", "gelu_pytorch_tanh" if family == "siglip" else "quick_gelu")
        if act not in _ACTS:
            raise HFError(f"{where}: hidden_act={act!r} not supported (one of {sorted(_ACTS)})")
        heads = int(_need(cfg, "num_attention_heads", where))
        return {
            "layers": int(_need(cfg, "num_hidden_layers", where)), "dim": int(_need(cfg, "hidden_size", where)),
            "mlp_hidden": int(_need(cfg, "intermediate_size", where)), "heads": heads, "kv_heads": heads,
            "image_size": int(_need(cfg, "image_size", where)), "patch_size": int(_need(cfg, "patch_size", where)),
            "channels": int(cfg.get("num_channels", 3)), "norm": "layer",
            "norm_eps": float(cfg.get("layer_norm_eps", 1e-6 if family == "siglip" else 1e-5)), "mlp": _ACTS[act],
            "qkv_bias": True, "out_bias": True, "mlp_bias": True, "class_token": family == "clip",
            "patch_bias": family == "siglip", "pre_norm": family == "clip",
            # last_hidden_state: SigLIP's after its post_layernorm, CLIP's before (CLIP norms
            # its pooled class token only)
            "head_norm": family == "siglip",
        }
    return arch


def _tower_names(family: str) -> Callable[[object], dict]:
    def names(cfg) -> dict:
        t = {("patch_embed", "kernel"): ("embeddings.patch_embedding.weight", PATCH),
             ("pos",): ("embeddings.position_embedding.weight", AS_IS)}
        if cfg.patch_bias:
            t[("patch_embed", "bias")] = ("embeddings.patch_embedding.bias", AS_IS)
        if cfg.class_token:
            t[("cls",)] = ("embeddings.class_embedding", AS_IS)
        if cfg.pre_norm:
            t.update(_layer_norm(("pre_norm",), "pre_layrnorm"))
        if cfg.head_norm:
            t.update(_layer_norm(("norm",), "post_layernorm"))
        layer = "encoder.layers.{i}."
        t.update(_layer_norm(("blocks", "attn_norm"), layer + "layer_norm1"))
        t.update(_layer_norm(("blocks", "mlp_norm"), layer + "layer_norm2"))
        for p, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            t[("blocks", "attn", p, "kernel")] = (layer + f"self_attn.{hf}.weight", LINEAR)
            t[("blocks", "attn", p, "bias")] = (layer + f"self_attn.{hf}.bias", AS_IS)
        for p, hf in (("up", "fc1"), ("down", "fc2")):
            t[("blocks", "mlp", p, "kernel")] = (layer + f"mlp.{hf}.weight", LINEAR)
            t[("blocks", "mlp", p, "bias")] = (layer + f"mlp.{hf}.bias", AS_IS)
        return t
    return names


def _layer_norm(path: tuple, name: str) -> dict:
    return {path + ("scale",): (name + ".weight", AS_IS), path + ("bias",): (name + ".bias", AS_IS)}


def _tower_unused(name: str, cfg) -> bool:
    """SigLIP's attention-pooling head; the final norm when the head does not apply it; the
    layers past the feature layer."""
    name = name.removeprefix("vision_model.")
    if name.startswith("head.") or (not cfg.head_norm and name.startswith("post_layernorm.")):
        return True
    parts = name.split(".")
    return name.startswith("encoder.layers.") and int(parts[2]) >= cfg.layers


def _tower(family: str, architecture: str) -> Family:
    return Family(family, "vision", _tower_arch(family), _tower_names(family), None, architecture,
                  _tower_unused, ("", "vision_model."))


def _whisper_arch(cfg: dict, where: str) -> dict:
    act = cfg.get("activation_function", "gelu")
    if act not in _ACTS:
        raise HFError(f"{where}: activation_function={act!r} not supported (one of {sorted(_ACTS)})")
    heads = int(_need(cfg, "encoder_attention_heads", where))
    positions = int(_need(cfg, "max_source_positions", where))
    # 10 ms frames; a clip is the 2 x max_source_positions frames the encoder takes
    return {
        "layers": int(_need(cfg, "encoder_layers", where)), "dim": int(_need(cfg, "d_model", where)),
        "mlp_hidden": int(_need(cfg, "encoder_ffn_dim", where)), "heads": heads, "kv_heads": heads,
        "mel_bins": int(_need(cfg, "num_mel_bins", where)), "frames_per_second": 100,
        "clip_seconds": 2 * positions / 100, "conv_kernel": 3, "conv_strides": (1, 2), "conv_padding": "torch",
        "conv_act": _ACTS[act], "norm": "layer", "norm_eps": 1e-5, "mlp": _ACTS[act],
        "qkv_bias": True, "k_bias": False, "out_bias": True, "mlp_bias": True,
    }


def _whisper_names(cfg) -> dict:
    t = {("conv1", "kernel"): ("encoder.conv1.weight", CONV1D), ("conv1", "bias"): ("encoder.conv1.bias", AS_IS),
         ("conv2", "kernel"): ("encoder.conv2.weight", CONV1D), ("conv2", "bias"): ("encoder.conv2.bias", AS_IS),
         ("pos",): ("encoder.embed_positions.weight", AS_IS)}
    t.update(_layer_norm(("norm",), "encoder.layer_norm"))
    layer = "encoder.layers.{i}."
    t.update(_layer_norm(("blocks", "attn_norm"), layer + "self_attn_layer_norm"))
    t.update(_layer_norm(("blocks", "mlp_norm"), layer + "final_layer_norm"))
    for p, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        t[("blocks", "attn", p, "kernel")] = (layer + f"self_attn.{hf}.weight", LINEAR)
        if p != "k":
            t[("blocks", "attn", p, "bias")] = (layer + f"self_attn.{hf}.bias", AS_IS)
    for p, hf in (("up", "fc1"), ("down", "fc2")):
        t[("blocks", "mlp", p, "kernel")] = (layer + f"{hf}.weight", LINEAR)
        t[("blocks", "mlp", p, "bias")] = (layer + f"{hf}.bias", AS_IS)
    return t


def _whisper_unused(name: str, cfg) -> bool:
    """The decoder (and a generation head): the encoder is what initialises the audio module."""
    return not name.removeprefix("model.").startswith("encoder.")


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llm", _decoder_arch("llama"), _decoder_names, _decoder_json("llama", "LlamaForCausalLM"),
                    "LlamaForCausalLM"),
    "qwen2": Family("qwen2", "llm", _decoder_arch("qwen2"), _decoder_names, _decoder_json("qwen2", "Qwen2ForCausalLM"),
                    "Qwen2ForCausalLM"),
    "siglip_vision_model": _tower("siglip", "SiglipVisionModel"),
    "siglip": _tower("siglip", "SiglipModel"),
    "clip_vision_model": _tower("clip", "CLIPVisionModel"),
    "clip": _tower("clip", "CLIPModel"),
    "whisper": Family("whisper", "audio", _whisper_arch, _whisper_names, None, "WhisperModel", _whisper_unused,
                      ("", "model.")),
}


def family_of(config: dict, where: str) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise HFError(f"{where}: unknown model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def default_family(module: str, cfg) -> Family:
    """The family an export writes when the module did not start from a checkpoint."""
    if module == "llm":
        return FAMILIES["qwen2"] if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias else FAMILIES["llama"]
    raise HFError(f"model.{module}: no Hugging Face family exports this module")
