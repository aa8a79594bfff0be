"""The layers of the Wan2.1 / Wan2.2 DiT (models/wan_model.py): timestep sinusoid, 3D RoPE, fp32 norms, self- and
cross-attention, the attention block, the output head and the CLIP image projection; key names as the official
checkpoints (docs/wan_architecture.md, "DiT"). Norms, modulation and the head run in fp32 with autocast off;
linears run in the compute dtype of their input.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import attention

Rope = tuple[Tensor, Tensor]  # (cos, sin), each [L, 1, head_dim / 2] fp32
CLIP_TOKENS = 257  # tokens of one CLIP image (1 + 16 x 16 patches); FLF2V uses two images


# ---- small numerical pieces ----------------------------------------------------------------------
def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that switches autocast off on `device` (so fp32 sections stay fp32 inside a bf16 autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """Timestep embedding [cos(t w_j), sin(t w_j)], w_j = 10000^(-j / (dim/2)), computed in fp64.

    t: [B] -> [B, dim] fp32 (cos half first, as Wan's `sinusoidal_embedding_1d`).
    """
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(pos, freqs)  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real channels of head_dim for the (t, h, w) axes: d - 4(d//6), 2(d//6), 2(d//6); 128 -> 44, 42, 42."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> Rope:
    """3D RoPE angles for a (F, H, W) token grid, tokens ordered f, h, w (w fastest).

    Channel pairs (2i, 2i+1) are complex numbers; the pairs are split over the axes (rope_split). On an axis
    with m real channels, pair j rotates by angle = index * 10000^(-2j / m).
    Returns (cos, sin), each [L, 1, head_dim / 2] fp32.
    """
    angles = []
    for axis, (m, n) in enumerate(zip(rope_split(head_dim), grid, strict=True)):
        freqs = torch.pow(10000.0, -torch.arange(0, m, 2, dtype=torch.float64, device=device).div(m))
        a = torch.outer(torch.arange(n, dtype=torch.float64, device=device), freqs)  # [n, m/2]
        shape = [1, 1, 1, m // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, m // 2))
    theta = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)  # [L, 1, d/2]
    return theta.cos().float(), theta.sin().float()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate channel pairs (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) in fp32; x: [B, L, H, D]."""
    cos, sin = rope
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def fp32_mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """Run a Linear/activation Sequential in fp32 whatever the parameter dtype (Wan's time embedding)."""
    for layer in mlp:
        is_linear = isinstance(layer, nn.Linear)
        x = F.linear(x, layer.weight.float(), layer.bias.float()) if is_linear else layer(x)
    return x


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (all heads together): x / sqrt(mean(x^2) + eps) * weight; fp32 normalise."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32; returns fp32 (Wan's `WanLayerNorm`, affine optional)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with no_autocast(x.device):
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


# ---- attention -----------------------------------------------------------------------------------
class WanSelfAttention(nn.Module):
    """q, k, v, o: Linear(D, D); RMSNorm on q and k over all of D; 3D RoPE on q, k; scale 1/sqrt(head_dim)."""

    # Sequence parallelism (inference/parallel.py sets it per instance): x holds this rank's token shard and
    # `seq_parallel.attention(q, k, v)` attends over the whole sequence. None: the plain single-process path.
    seq_parallel = None

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, H, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        """x: [B, L, D] (compute dtype) -> [B, L, D]."""
        q = apply_rope(self.heads(self.norm_q(self.q(x))), rope)
        k = apply_rope(self.heads(self.norm_k(self.k(x))), rope)
        attend = attention if self.seq_parallel is None else self.seq_parallel.attention
        return self.o(attend(q, k, self.heads(self.v(x))).flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Attention from the video tokens to the context (no RoPE).

    I2V adds k_img, v_img, norm_k_img: the first `img_len` context tokens (CLIP) get their own keys/values,
    the two attentions share q and their outputs are summed before o:
    o(Attn(q, k, v) + Attn(q, k_img, v_img)).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 image: bool = False) -> None:
        super().__init__(dim, num_heads, qk_norm, eps)
        self.image = image
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor, img_len: int = 0) -> Tensor:
        """x: [B, L, D], context: [B, img_len + text_len, D] -> [B, L, D]."""
        q = self.heads(self.norm_q(self.q(x)))
        text = context[:, img_len:]
        out = attention(q, self.heads(self.norm_k(self.k(text))), self.heads(self.v(text)))
        if self.image:
            img = context[:, :img_len]
            k_img = self.heads(self.norm_k_img(self.k_img(img)))
            out = out + attention(q, k_img, self.heads(self.v_img(img)))
        return self.o(out.flatten(2))


# ---- blocks --------------------------------------------------------------------------------------
class WanAttentionBlock(nn.Module):
    """One DiT block (docs/wan_architecture.md step 6). Keys: modulation, norm3, self_attn.*, cross_attn.*,
    ffn.{0,2}."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, image: bool, qk_norm: bool = True,
                 cross_attn_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps, image=image)
        self.norm2 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, img_len: int, rope: Rope) -> Tensor:
        """x: [B, L, D] fp32 residual stream; context: [B, Lc, D] in the compute dtype;
        e0: [B, 6, D] fp32 (one timestep per sample) or [B, L, 6, D] (one per token, Wan2.2 TI2V)."""
        dtype = context.dtype
        with no_autocast(x.device):
            if e0.ndim == 4:  # per token: table [1, 6, D] + [B, L, 6, D] -> 6 x [B, L, D]
                m = (self.modulation.float() + e0).unbind(2)
            else:
                m = (self.modulation.float() + e0).chunk(6, dim=1)  # 6 x [B, 1, D]
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = m
            h = (self.norm1(x) * (1 + scale_sa) + shift_sa).to(dtype)
        x = x + gate_sa * self.self_attn(h, rope).float()
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, img_len).float()
        with no_autocast(x.device):
            h = (self.norm2(x) * (1 + scale_ff) + shift_ff).to(dtype)
        return x + gate_ff * self.ffn(h).float()


class Head(nn.Module):
    """Output layer in fp32: head(norm(x) (1 + scale) + shift), (shift, scale) = modulation [1, 2, D] + e."""

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int], eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = LayerNorm32(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x: [B, L, D] fp32, e: [B, D] or per token [B, L, D] fp32 -> [B, L, out_dim * prod(patch)] fp32."""
        with no_autocast(x.device):
            if e.ndim == 3:  # per token: [1, 2, D] + [B, L, 1, D] -> 2 x [B, L, D]
                shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
            else:
                shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D] each
            h = self.norm(x) * (1 + scale) + shift
            return F.linear(h, self.head.weight.float(), self.head.bias.float())


class MLPProj(nn.Module):
    """CLIP features -> context tokens: LayerNorm, Linear, GELU, Linear, LayerNorm (`img_emb.proj.{0,1,3,4}`).

    FLF2V adds `emb_pos` [1, 2*257, clip_dim], a learnt position for the first-frame and last-frame tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, flf_pos_emb: bool = False) -> None:
        super().__init__()
        self.proj = nn.Sequential(LayerNorm32(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), LayerNorm32(out_dim))
        if flf_pos_emb:
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * CLIP_TOKENS, in_dim))

    def forward(self, clip_fea: Tensor, dtype: torch.dtype) -> Tensor:
        """clip_fea: [B, N, clip_dim] -> [B, N, dim] in `dtype` (norms in fp32, linears in `dtype`)."""
        if hasattr(self, "emb_pos"):
            clip_fea = clip_fea.float() + self.emb_pos.float()
        norm_in, fc1, act, fc2, norm_out = self.proj
        h = fc2(act(fc1(norm_in(clip_fea).to(dtype))))
        return norm_out(h).to(dtype)
