"""Named model sizes: the real Wan2.1 / Wan2.2 checkpoints and tiny CPU flavours of the same architecture.

A `ModelSpec` holds the configs of the four components. The DiT config uses the field names of the official
`config.json`; the other components take their constructor keyword arguments. Real sizes are exercised on the
`meta` device in the tests (no memory), tiny ones run a full generation on a CPU in seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

_WAN_COMMON = dict(freq_dim=256, text_len=512, out_dim=16, eps=1e-6)
_UMT5_XXL = dict(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                 num_buckets=32)
_CLIP_VIT_H14 = dict(image_size=224, patch_size=14, dim=1280, mlp_ratio=4, out_dim=1024, num_heads=16,
                     num_layers=32)
_WAN_VAE = dict(dim=96, z_dim=16)
_WAN22_VAE = dict(dim=160, dec_dim=256, z_dim=48)  # the Wan2.2 VAE: 16x16 spatial, 4x temporal (docs/wan22.md)

# Official file names inside a Wan model folder (docs/lightx2v_formats.md, "Model folders").
WAN_FILES = {
    "vae": "Wan2.1_VAE.pth",
    "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "google/umt5-xxl",
    "image_encoder": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
}

# Tiny flavours: a 7M-parameter DiT over a compact linear latent (PCA codec), a frozen 2-layer umT5 with a
# byte-level tokenizer, and a 2-layer CLIP tower. TINY_Z is the latent width (codec channels), TINY_STRIDE the
# codec's spatial stride: 4x4x4 blocks, 16 channels (64 values per 2x2 DiT token; 108 tokens for the default
# 9x48x48 clips).
TINY_Z = 16
TINY_STRIDE = 4
TINY_TEXT = dict(vocab_size=259, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2, num_buckets=32)
TINY_CLIP = dict(image_size=32, patch_size=8, dim=64, mlp_ratio=4, out_dim=32, num_heads=2, num_layers=2)
_TINY_DIT = dict(dim=256, ffn_dim=1024, freq_dim=256, num_heads=4, num_layers=6, text_len=64,
                 text_dim=TINY_TEXT["dim"], out_dim=TINY_Z, eps=1e-6)


@dataclass
class ModelSpec:
    """Configs of the components of one named model size."""

    name: str
    dit: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer: dict[str, Any]
    image_encoder: dict[str, Any] | None = None
    sample: dict[str, Any] = field(default_factory=dict)  # default frames/size for this size
    experts: dict[str, Any] | None = None  # Wan2.2 A14B: {"boundary": fraction of 1000}; None: one DiT

    @property
    def task(self) -> str:
        return "i2v" if self.dit["model_type"] in ("i2v", "flf2v") else "t2v"


MODEL_SPECS: dict[str, ModelSpec] = {
    "wan2.1-t2v-1.3b": ModelSpec(
        "wan2.1-t2v-1.3b",
        dit=dict(model_type="t2v", in_dim=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, **_WAN_COMMON),
        vae=dict(type="wan_vae", **_WAN_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), sample=dict(frames=81, height=480, width=832)),
    "wan2.1-t2v-14b": ModelSpec(
        "wan2.1-t2v-14b",
        dit=dict(model_type="t2v", in_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, **_WAN_COMMON),
        vae=dict(type="wan_vae", **_WAN_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), sample=dict(frames=81, height=720, width=1280)),
    "wan2.1-i2v-14b-480p": ModelSpec(
        "wan2.1-i2v-14b-480p",
        dit=dict(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, **_WAN_COMMON),
        vae=dict(type="wan_vae", **_WAN_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), image_encoder=dict(type="clip", **_CLIP_VIT_H14),
        sample=dict(frames=81, height=480, width=832)),
    "wan2.1-i2v-14b-720p": ModelSpec(
        "wan2.1-i2v-14b-720p",
        dit=dict(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, **_WAN_COMMON),
        vae=dict(type="wan_vae", **_WAN_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), image_encoder=dict(type="clip", **_CLIP_VIT_H14),
        sample=dict(frames=81, height=720, width=1280)),
    # Wan2.2 (docs/wan22.md). A14B: two experts with the Wan2.1-14B DiT, `high_noise_model/` for t >= boundary
    # * 1000 and `low_noise_model/` below; `dit` is one expert's config, `experts` the boundary. The I2V experts
    # take y (mask + first-frame latent, in_dim 36) but no CLIP tower (clip_dim None: no img_emb, no image
    # cross-attention). TI2V-5B: one dense DiT over the Wan2.2 VAE's 48-channel latent (16x spatial).
    "wan2.2-t2v-a14b": ModelSpec(
        "wan2.2-t2v-a14b",
        dit=dict(model_type="t2v", in_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, **_WAN_COMMON),
        vae=dict(type="wan_vae", **_WAN_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), sample=dict(frames=81, height=720, width=1280),
        experts=dict(boundary=0.875)),
    "wan2.2-i2v-a14b": ModelSpec(
        "wan2.2-i2v-a14b",
        dit=dict(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, clip_dim=None,
                 **_WAN_COMMON),
        vae=dict(type="wan_vae", **_WAN_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), sample=dict(frames=81, height=720, width=1280),
        experts=dict(boundary=0.900)),
    "wan2.2-ti2v-5b": ModelSpec(
        "wan2.2-ti2v-5b",
        dit=dict(model_type="ti2v", in_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, freq_dim=256,
                 text_len=512, out_dim=48, eps=1e-6),
        vae=dict(type="wan22_vae", **_WAN22_VAE), text_encoder=dict(type="umt5", **_UMT5_XXL),
        tokenizer=dict(type="hf"), sample=dict(frames=121, height=704, width=1280)),
    "tiny-t2v": ModelSpec(
        "tiny-t2v",
        dit=dict(model_type="t2v", in_dim=TINY_Z, **_TINY_DIT),
        vae=dict(type="pca_codec", z_dim=TINY_Z, spatial_stride=TINY_STRIDE),
        text_encoder=dict(type="umt5", **TINY_TEXT),
        tokenizer=dict(type="byte"), sample=dict(frames=9, height=48, width=48)),
    "tiny-i2v": ModelSpec(
        "tiny-i2v",
        # I2V input = noisy latent (z) + mask (4) + VAE latent of the first frame (z), as in Wan.
        dit=dict(model_type="i2v", in_dim=2 * TINY_Z + 4, clip_dim=TINY_CLIP["dim"], **_TINY_DIT),
        vae=dict(type="pca_codec", z_dim=TINY_Z, spatial_stride=TINY_STRIDE),
        text_encoder=dict(type="umt5", **TINY_TEXT),
        tokenizer=dict(type="byte"), image_encoder=dict(type="clip", **TINY_CLIP),
        sample=dict(frames=9, height=48, width=48)),
}


def get_spec(name: str) -> ModelSpec:
    """Return a deep copy of the named spec (callers may edit it)."""
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown model size {name!r}; known: {sorted(MODEL_SPECS)}")
    return copy.deepcopy(MODEL_SPECS[name])
