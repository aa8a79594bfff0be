"""CLIP ViT image tower used by Wan2.1 I2V (open-clip xlm-roberta-large-vit-huge-14, visual part only).

State-dict keys are exactly the `visual.*` keys of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
(docs/wan_architecture.md, "CLIP image tower"). Wan uses the tokens after block 31 of 32 (no post-norm, no head) as
image
features; `post_norm` and `head` exist only so that the official file loads strictly. Maps 1:1 onto
transformers' `CLIPVisionModel` (hidden_states[-2]); see tests/test_text_image_encoders.py for the key table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (also for bf16/fp16 weights), returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class SelfAttention(nn.Module):
    """Fused qkv projection (rows ordered q, k, v), scaled dot-product attention, output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, n, S, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, n, S, d)
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with an exact-GELU MLP (`mlp.0`, `mlp.2`)."""

    def __init__(self, dim: int, mlp_ratio: float, num_heads: int, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token, a pre-norm before the blocks (hence no patch-conv bias) and a token head."""

    def __init__(self, image_size: int, patch_size: int, dim: int, mlp_ratio: float, out_dim: int,
                 num_heads: int, num_layers: int, eps: float) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        gain = 1.0 / math.sqrt(dim)
        num_tokens = 1 + (image_size // patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls_embedding = nn.Parameter(gain * torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(gain * torch.randn(1, num_tokens, dim))
        self.pre_norm = LayerNorm(dim, eps=eps)
        self.transformer = nn.Sequential(*(AttentionBlock(dim, mlp_ratio, num_heads, eps)
                                           for _ in range(num_layers)))
        self.post_norm = LayerNorm(dim, eps=eps)  # unused by Wan
        self.head = nn.Parameter(gain * torch.randn(dim, out_dim))  # unused by Wan

    def forward(self, pixels: Tensor, num_blocks: int | None = None) -> Tensor:
        """Normalised pixels [B, 3, S, S] -> tokens [B, 1 + (S/p)^2, dim] after the first `num_blocks` blocks
        (all when None); no post-norm, no head."""
        x = pixels.to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        x = self.pre_norm(x + self.pos_embedding)
        blocks = self.transformer if num_blocks is None else self.transformer[:num_blocks]
        return blocks(x)


class CLIPImageEncoder(nn.Module):
    """Wan's CLIP image features. Defaults are ViT-H/14 at 224 (632M parameters in `visual`)."""

    def __init__(self, image_size: int = 224, patch_size: int = 14, dim: int = 1280, mlp_ratio: float = 4,
                 out_dim: int = 1024, num_heads: int = 16, num_layers: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(image_size=image_size, patch_size=patch_size, dim=dim,
                                           mlp_ratio=mlp_ratio, out_dim=out_dim, num_heads=num_heads,
                                           num_layers=num_layers, eps=eps)
        self.image_size, self.dim, self.num_layers = image_size, dim, num_layers
        self.visual = VisionTransformer(image_size, patch_size, dim, mlp_ratio, out_dim, num_heads,
                                        num_layers, eps)

    @property
    def num_tokens(self) -> int:
        return self.visual.pos_embedding.shape[1]

    def preprocess(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> bicubic resize to image_size (no crop, no clamp), [0, 1], CLIP
        mean/std; fp32."""
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False)
        x = x * 0.5 + 0.5
        # constants, not buffers: a model built on `meta` and loaded with assign=True keeps no meta tensors
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels -> features of the penultimate block [B, tokens, dim]."""
        return self.visual(pixels, num_blocks=self.num_layers - 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> CLIP features [B, 1 + (S/p)^2, dim] in fp32."""
        device = self.visual.patch_embedding.weight.device
        return self(self.preprocess(images.to(device))).float()
