"""Model configs: one frozen dataclass per module type and their composition, with the analytic
parameter counts the planner's cost model reads (pure Python)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from dip_jax import specs
from dip_jax.config.checks import positive, require
from dip_jax.specs.params import (attention_params, mlp_params, norm_params, projector_params,  # noqa: F401
                                  swiglu_params)

MODULES = ("vision", "audio", "llm", "dit")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu", "gelu_tanh", "quick_gelu")
ROPE_SCALINGS = ("default", "linear", "llama3")
# attention backends (dip_jax/models/attention.py): auto picks one per platform, dtype and length
ATTENTIONS = ("auto", "xla", "cudnn", "splash", "blockwise")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    layers: int = 2
    dim: int = 64
    mlp_hidden: int = 128
    heads: int = 4
    kv_heads: int = 4
    # the block family: what a pretrained checkpoint's architecture needs (hf/ reads these off
    # its config.json); the defaults are the RMSNorm + bias-free SwiGLU block
    norm: str = "rms"                # rms | layer
    norm_eps: float = 1e-6
    mlp: str = "swiglu"              # swiglu | gelu (exact) | gelu_tanh | quick_gelu
    qkv_bias: bool = False
    k_bias: bool = True              # with qkv_bias: whether k has one too (Whisper's has none)
    out_bias: bool = False           # attention output projection
    mlp_bias: bool = False
    # a local Hugging Face directory whose weights (and architecture) the module starts from
    init_from: str = ""

    def _check(self, prefix: str) -> None:
        positive(self, prefix, "layers", "dim", "mlp_hidden", "heads", "kv_heads", "norm_eps")
        require(self.norm in NORMS, f"{prefix}.norm", f"unknown norm {self.norm!r}; choose one of {NORMS}")
        require(self.mlp in MLPS, f"{prefix}.mlp", f"unknown mlp {self.mlp!r}; choose one of {MLPS}")
        require(self.dim % self.heads == 0, f"{prefix}.dim", f"{self.dim} not divisible by heads={self.heads}")
        require(self.heads % self.kv_heads == 0, f"{prefix}.kv_heads",
                f"heads={self.heads} not divisible by kv_heads={self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def norm_params(self) -> int:
        return norm_params(self.dim, self.norm)

    def attn_params(self, kv_dim: Optional[int] = None) -> int:
        return attention_params(self.dim, self.heads, self.kv_heads, kv_dim, self.qkv_bias, self.out_bias,
                                self.k_bias)

    def mlp_params(self) -> int:
        return mlp_params(self.dim, self.mlp_hidden, self.mlp, self.mlp_bias)

    def block_params(self) -> int:
        """Pre-norm transformer block: 2 norms + attention + MLP."""
        return 2 * self.norm_params() + self.attn_params() + self.mlp_params()


@dataclasses.dataclass(frozen=True)
class VisionConfig(BlockConfig):
    image_size: int = 16
    patch_size: int = 4
    channels: int = 3
    spatial_merge: int = 2
    # tower families (CLIP, SigLIP): a class token (dropped before the projector, as LLaVA's
    # default feature selection does), a bias on the patch embedding, a norm after the
    # embeddings (CLIP's pre_layrnorm) and the final norm before the projector
    class_token: bool = False
    patch_bias: bool = True
    pre_norm: bool = False
    head_norm: bool = True
    # what of a pretrained tower feeds the projector: 0 = its last_hidden_state (SigLIP's with
    # its final norm); k != 0 = hidden_states[k] as LLaVA's vision_feature_layer counts them
    # (-1: the last layer's output, -2: the one before; no final norm): init_from keeps the
    # layers up to it
    feature_layer: int = 0

    def check(self, prefix: str = "model.vision") -> None:
        self._check(prefix)
        positive(self, prefix, "image_size", "patch_size", "channels", "spatial_merge")
        require(self.image_size % self.patch_size == 0, f"{prefix}.patch_size",
                f"image_size={self.image_size} not divisible by patch_size={self.patch_size}")
        require(self.patches_per_side % self.spatial_merge == 0, f"{prefix}.spatial_merge",
                f"{self.patches_per_side} patches per side not divisible by {self.spatial_merge}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def tokens_per_image(self) -> int:
        return self.patches // self.spatial_merge ** 2

    @property
    def tokens(self) -> int:
        """Tokens through the blocks: the patches and the class token, if any."""
        return self.patches + self.class_token

    def embed_params(self) -> int:
        return self.patch_size ** 2 * self.channels * self.dim + self.dim * self.patch_bias + \
            self.tokens * self.dim + self.dim * self.class_token + self.norm_params() * self.pre_norm

    def head_params(self, out_dim: int) -> int:
        return self.norm_params() * self.head_norm + projector_params(self.spatial_merge ** 2 * self.dim, out_dim)

    def param_count(self, out_dim: int) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.head_params(out_dim)


@dataclasses.dataclass(frozen=True)
class AudioConfig(BlockConfig):
    mel_bins: int = 16
    frames_per_second: int = 32
    clip_seconds: float = 1.0
    conv_kernel: int = 3
    # the two-conv stem: its strides, padding ("same", or "torch": kernel // 2 on both sides as
    # torch's Conv1d(padding=1) does) and activation (Whisper: strides (1, 2), torch, gelu)
    conv_strides: tuple = (2, 2)
    conv_padding: str = "same"
    conv_act: str = "gelu_tanh"

    def check(self, prefix: str = "model.audio") -> None:
        self._check(prefix)
        positive(self, prefix, "mel_bins", "frames_per_second", "clip_seconds", "conv_kernel")
        require(len(self.conv_strides) == 2 and all(s in (1, 2) for s in self.conv_strides), f"{prefix}.conv_strides",
                f"two strides of 1 or 2, got {self.conv_strides!r}")
        require(self.conv_padding in ("same", "torch"), f"{prefix}.conv_padding", "choose same or torch")
        require(self.conv_act in MLPS[1:], f"{prefix}.conv_act", f"choose one of {MLPS[1:]}")
        require(self.frames_per_clip % self.subsampling == 0, f"{prefix}.frames_per_second",
                f"frames per clip ({self.frames_per_clip}) must be divisible by the "
                f"{self.subsampling}x conv subsampling")

    @property
    def subsampling(self) -> int:
        return self.conv_strides[0] * self.conv_strides[1]

    @property
    def frames_per_clip(self) -> int:
        return int(round(self.frames_per_second * self.clip_seconds))

    @property
    def tokens_per_clip(self) -> int:
        return self.frames_per_clip // self.subsampling

    def embed_params(self) -> int:
        k = self.conv_kernel
        return (k * self.mel_bins * self.dim + self.dim) + (k * self.dim * self.dim + self.dim) + \
            self.tokens_per_clip * self.dim

    def head_params(self, out_dim: int) -> int:
        return self.norm_params() + projector_params(self.dim, out_dim)

    def param_count(self, out_dim: int) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.head_params(out_dim)


@dataclasses.dataclass(frozen=True)
class LLMConfig(BlockConfig):
    vocab_size: int = 256
    rope_theta: float = 10000.0
    # Hugging Face rope scaling as (key, value) pairs, e.g. (("rope_type", "llama3"), ("factor", 8.0),
    # ...); () = none. Types: linear, llama3.
    rope_scaling: tuple = ()
    tie_embeddings: bool = False     # the LM head reads the token embedding (no lm_head matrix)

    def check(self, prefix: str = "model.llm") -> None:
        self._check(prefix)
        positive(self, prefix, "vocab_size", "rope_theta")
        require(self.head_dim % 2 == 0, f"{prefix}.heads", f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling:
            kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type"))
            require(kind in ROPE_SCALINGS, f"{prefix}.rope_scaling",
                    f"unknown rope_type {kind!r}; supported: {ROPE_SCALINGS}")

    def embed_params(self) -> int:
        return self.vocab_size * self.dim

    def head_params(self) -> int:
        return self.norm_params() + (0 if self.tie_embeddings else self.dim * self.vocab_size)

    def param_count(self) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.head_params()


@dataclasses.dataclass(frozen=True)
class DiTConfig(BlockConfig):
    latent_channels: int = 8
    latent_frames_per_second: int = 4
    tokens_per_frame: int = 4
    clip_seconds: float = 1.0
    cond_tokens: int = 16
    time_embed_dim: int = 64

    def check(self, prefix: str = "model.dit") -> None:
        self._check(prefix)
        positive(self, prefix, "latent_channels", "latent_frames_per_second", "tokens_per_frame",
                 "clip_seconds", "cond_tokens", "time_embed_dim")
        require(self.time_embed_dim % 2 == 0, f"{prefix}.time_embed_dim", "must be even")

    @property
    def tokens_per_clip(self) -> int:
        return int(round(self.latent_frames_per_second * self.clip_seconds)) * self.tokens_per_frame

    def block_params(self) -> int:
        """adaLN-modulated block: self-attention, cross-attention to the llm condition, SwiGLU."""
        d = self.dim
        return (d * 6 * d + 6 * d) + self.norm_params() + 2 * self.attn_params() + self.mlp_params()

    def embed_params(self, cond_dim: int) -> int:
        d = self.dim
        return (self.latent_channels * d + d) + self.tokens_per_clip * d + \
            (self.time_embed_dim * d + d + d * d + d) + (cond_dim * d + d)

    def head_params(self) -> int:
        d = self.dim
        return (d * 2 * d + 2 * d) + (d * self.latent_channels + self.latent_channels)

    def param_count(self, cond_dim: int) -> int:
        return self.embed_params(cond_dim) + self.layers * self.block_params() + self.head_params()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    vision: Optional[VisionConfig] = VisionConfig()
    audio: Optional[AudioConfig] = AudioConfig()
    llm: LLMConfig = LLMConfig()
    dit: Optional[DiTConfig] = None
    dit_loss_weight: float = 1.0
    # what matmuls and the activations between pipeline stages run in; parameters, optimizer
    # state, softmax and losses stay float32 either way
    compute_dtype: str = "float32"
    # how every attention layer computes: xla (jax.nn.dot_product_attention over a dense mask,
    # S x T scores), blockwise (flash-style online softmax in plain JAX, O(S) residuals),
    # cudnn (GPU, bf16), splash (TPU), or auto (models/attention.py: choose)
    attention: str = "xla"
    # configs of module types registered with dip_jax.specs.register: ((name, config), ...)
    extra_modules: tuple = ()

    def check(self) -> None:
        for name in MODULES:
            sub = getattr(self, name)
            if sub is not None:
                sub.check(f"model.{name}")
        require(self.llm is not None, "model.llm", "the llm backbone is required")
        seen = set()
        for entry in self.extra_modules:
            require(isinstance(entry, tuple) and len(entry) == 2, "model.extra_modules",
                    f"entries are (name, config) pairs, got {entry!r}")
            name, sub = entry
            require(name not in MODULES and name not in seen, "model.extra_modules", f"module {name!r} given twice")
            seen.add(name)
            require(name in specs.registered(), "model.extra_modules",
                    f"no module spec {name!r} is registered (dip_jax.specs.register)")
            require(specs.get(name).role == specs.ENCODER, f"model.extra_modules.{name}",
                    "only encoders can be added (the model has one backbone and at most one generator)")
            if hasattr(sub, "check"):
                sub.check(f"model.extra_modules.{name}")
        require(self.dit_loss_weight >= 0, "model.dit_loss_weight", "must be >= 0")
        require(self.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype",
                f"unknown dtype {self.compute_dtype!r}; choose float32 or bfloat16")
        require(self.attention in ATTENTIONS, "model.attention",
                f"unknown attention backend {self.attention!r}; choose one of {ATTENTIONS}")

    @property
    def modules(self) -> tuple[str, ...]:
        """Present modules in graph order: encoders (built-in, then extra) -> llm -> dit."""
        names = [m for m in MODULES if getattr(self, m) is not None] + [n for n, _ in self.extra_modules]
        return specs.graph_order(names)

    def module(self, name: str):
        """The config of module `name` (built-in field or extra module)."""
        if name in MODULES:
            return getattr(self, name)
        for n, sub in self.extra_modules:
            if n == name:
                return sub
        raise KeyError(f"model has no module {name!r}")

    def with_modules(self, subs: dict) -> "ModelConfig":
        """A copy with the configs of the modules in `subs` replaced."""
        extra = tuple((n, subs.get(n, c)) for n, c in self.extra_modules)
        return dataclasses.replace(self, extra_modules=extra, **{k: v for k, v in subs.items() if k in MODULES})

    @property
    def width(self) -> int:
        """The backbone's hidden width: what encoders project into, what the generator reads."""
        return self.llm.dim

    def module_param_count(self, name: str) -> int:
        return specs.get(name).param_count(self.module(name), self.width)

    def param_count(self) -> int:
        return sum(self.module_param_count(m) for m in self.modules)
