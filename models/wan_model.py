"""The Wan2.1 / Wan2.2 diffusion transformer (DiT), key-compatible with the official checkpoints.

Architecture and key names: docs/wan_architecture.md ("DiT"); the Wan2.2 variants: docs/wan22_dit.md. One
forward, for a batch of B videos on the same latent grid (F, H, W), patch (pt, ph, pw), D = dim,
L = (F/pt)(H/ph)(W/pw) tokens:

    tokens  = patch_embedding([x; y])                        [B, L, D]   (y: I2V mask + image latent)
    e       = time_embedding(sinusoid(t))                    [B, D]      fp32
    e0      = time_projection(e)                             [B, 6, D]   fp32
    context = [img_emb(clip_fea); text_embedding(pad(ctx))]  [B, Limg + text_len, D]
    per block (shift/scale/gate = modulation + e0):
        x += gate_sa * SelfAttn(norm1(x) (1 + scale_sa) + shift_sa)     with 3D RoPE on q, k
        x += CrossAttn(norm3(x), context)
        x += gate_ff * FFN(norm2(x) (1 + scale_ff) + shift_ff)
    v       = unpatchify(head(norm(x) (1 + scale) + shift)), (shift, scale) = head.modulation + e

Wan2.2 variants: the I2V-A14B experts take y but have no CLIP branch (`clip_dim=None`: no img_emb, no k_img /
v_img / norm_k_img, context = text only); TI2V-5B (`model_type='ti2v'`, in_dim = out_dim = 48, no y) may take
one timestep per token, t [B, L], giving e [B, L, D] and e0 [B, L, 6, D]: every modulation (blocks and head)
is then per token.

Precision follows Wan: the residual stream, the time embedding, the modulation, the norms and the head run in
fp32 (with autocast switched off); the linears of attention / FFN / text / image embedding run in the dtype of
`patch_embedding.weight` (the "compute dtype", e.g. bf16). The network knows nothing about diffusion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.wan_layers import (
    Head,
    MLPProj,
    RMSNorm,
    Rope,
    WanAttentionBlock,
    fp32_mlp,
    no_autocast,
    rope_tables,
    sinusoidal_embedding,
)

REQUIRED = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads",
            "num_layers")
OPTIONAL = ("patch_size", "text_dim", "qk_norm", "cross_attn_norm", "eps", "clip_dim")
IGNORED = ("_class_name", "_diffusers_version", "__name__")
MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")
Y_TYPES = ("i2v", "flf2v")  # model types that take y (mask + image latent) concatenated to x
_ROPE_CACHE_SIZE = 8


# ---- the model -----------------------------------------------------------------------------------
class WanModel(nn.Module):
    """Wan DiT: Wan2.1 T2V (`model_type='t2v'`), I2V ('i2v'), first-last-frame I2V ('flf2v'); Wan2.2 A14B
    experts (T2V: 't2v'; I2V: 'i2v' with `clip_dim=None`) and TI2V-5B ('ti2v', per-token timesteps).

    state_dict keys and shapes equal the official checkpoint's (no prefix, RoPE tables are not stored).
    `clip_dim=None` (i2v only) builds no CLIP image branch; `clip_dim_of(state)` tells from the weights.
    Set `gradient_checkpointing = True` to recompute each block in backward (torch.utils.checkpoint).
    """

    # Sequence parallelism (inference/parallel.py `attach`): shards the tokens after the patch embedding and gathers
    # the head's output. None: the single-process path.
    seq_parallel = None

    def __init__(self, *, model_type: str, text_len: int, in_dim: int, dim: int, ffn_dim: int, freq_dim: int,
                 out_dim: int, num_heads: int, num_layers: int, patch_size: Sequence[int] = (1, 2, 2),
                 text_dim: int = 4096, qk_norm: bool = True, cross_attn_norm: bool = True, eps: float = 1e-6,
                 clip_dim: int | None = 1280) -> None:
        super().__init__()
        _check_args(model_type, dim, num_heads, patch_size, freq_dim, clip_dim)
        self.model_type, self.patch_size = model_type, tuple(int(p) for p in patch_size)
        self.text_len, self.in_dim, self.dim, self.ffn_dim = text_len, in_dim, dim, ffn_dim
        self.freq_dim, self.text_dim, self.out_dim = freq_dim, text_dim, out_dim
        self.num_heads, self.num_layers, self.head_dim = num_heads, num_layers, dim // num_heads
        self.qk_norm, self.cross_attn_norm, self.eps, self.clip_dim = qk_norm, cross_attn_norm, eps, clip_dim
        self.gradient_checkpointing = False
        self._rope_cache: dict[tuple, Rope] = {}

        # The CLIP image branch (img_emb + image cross-attention): Wan2.1 I2V / FLF2V; not the Wan2.2 I2V experts.
        image = model_type in Y_TYPES and clip_dim is not None
        if model_type == "ti2v" and in_dim != out_dim:
            raise ValueError(f"a ti2v model takes the latent alone (in_dim == out_dim), got in_dim={in_dim}, "
                             f"out_dim={out_dim}")
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, image, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers))
        self.head = Head(dim, out_dim, self.patch_size, eps)
        if image:
            self.img_emb = MLPProj(clip_dim, dim, flf_pos_emb=model_type == "flf2v")
        self.init_weights()

    # ---- config ----------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments with official `config.json` names; round-trips through `from_config`."""
        cfg = {k: getattr(self, k) for k in REQUIRED + OPTIONAL}
        cfg["patch_size"] = list(self.patch_size)
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WanModel:
        """Build from an official `config.json` dict (+ optional tiny-only fields text_dim, clip_dim, ...).

        `_class_name`, `_diffusers_version`, `__name__` are ignored; unknown or missing keys raise ValueError.
        """
        unknown = sorted(set(config) - set(REQUIRED) - set(OPTIONAL) - set(IGNORED))
        if unknown:
            raise ValueError(f"unknown WanModel config keys {unknown}; allowed: {list(REQUIRED + OPTIONAL)}")
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise ValueError(f"WanModel config is missing {missing}")
        return cls(**{k: v for k, v in config.items() if k not in IGNORED})

    # ---- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (Wan's `init_weights`), complete so that it also fills a
        model materialised from `meta` with `to_empty`: Linear xavier-uniform / bias 0, patch embedding
        xavier-uniform over its flattened kernel, text/time MLP weights normal(0.02), head.head.weight 0,
        modulations randn / sqrt(D), norms weight 1 / bias 0, FLF2V emb_pos 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | RMSNorm) and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            if isinstance(getattr(m, "modulation", None), nn.Parameter):
                nn.init.normal_(m.modulation, std=self.dim**-0.5)
        self.patch_embedding.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for mlp in (self.text_embedding, self.time_embedding):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if hasattr(self, "img_emb") and hasattr(self.img_emb, "emb_pos"):
            nn.init.zeros_(self.img_emb.emb_pos)

    # ---- forward pieces --------------------------------------------------------------------------
    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """(cos, sin) for a token grid, computed once per (grid, device) and cached (not in state_dict)."""
        key = (*grid, str(device))
        if key not in self._rope_cache:
            # normal (not inference) tensors, even if first built under inference_mode
            with torch.inference_mode(False), torch.no_grad():
                tables = rope_tables(self.head_dim, grid, device)
            if len(self._rope_cache) >= _ROPE_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = tables
        return self._rope_cache[key]

    def embed_time(self, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """t: [B] (or a scalar) in [0, 1000] -> e [B, D], e0 [B, 6, D]; per token (ti2v) t [B, L] ->
        e [B, L, D], e0 [B, L, 6, D]; all fp32."""
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 2:
            return self._embed_time_per_token(t, batch)
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [{batch}] (one timestep per sample), got {tuple(t.shape)}")
        with no_autocast(t.device):
            e = fp32_mlp(self.time_embedding, sinusoidal_embedding(self.freq_dim, t))
            e0 = fp32_mlp(self.time_projection, e).unflatten(1, (6, self.dim))
        return e, e0

    def _embed_time_per_token(self, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """t [B, L] -> e [B, L, D], e0 [B, L, 6, D] fp32. The MLPs run once per distinct value (a TI2V step has
        two: 0 and t) and the rows are gathered per token: the same numbers as embedding every token."""
        if self.model_type != "ti2v":
            raise ValueError(f"per-token timesteps t [B, L] are a ti2v feature; a {self.model_type} model takes "
                             f"t [B], got {tuple(t.shape)}")
        if t.shape[0] != batch:
            raise ValueError(f"t must be [{batch}] or [{batch}, L] (L tokens), got {tuple(t.shape)}")
        values, index = torch.unique(t, return_inverse=True)  # [U], [B, L]
        with no_autocast(t.device):
            e = fp32_mlp(self.time_embedding, sinusoidal_embedding(self.freq_dim, values))  # [U, D]
            e0 = fp32_mlp(self.time_projection, e).unflatten(1, (6, self.dim))  # [U, 6, D]
        return e[index], e0[index]

    def pad_context(self, context: Tensor | Sequence[Tensor], batch: int) -> Tensor:
        """Context [B, L, text_dim] or a list of [L_i, text_dim] -> [B, text_len, text_dim], zero-padded."""
        if not isinstance(context, Tensor):
            if any(c.ndim != 2 for c in context):
                raise ValueError("a context list must hold [L_i, text_dim] tensors")
            context = nn.utils.rnn.pad_sequence(list(context), batch_first=True)
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.text_dim:
            raise ValueError(f"context must be [{batch}, L <= {self.text_len}, {self.text_dim}], "
                             f"got {tuple(context.shape)}")
        if context.shape[1] > self.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={self.text_len}")
        return F.pad(context, (0, 0, 0, self.text_len - context.shape[1]))

    def embed_context(self, context: Tensor | Sequence[Tensor], clip_fea: Tensor | None,
                      batch: int) -> tuple[Tensor, int]:
        """-> ([B, img_len + text_len, D] in the compute dtype, img_len); image tokens come first (I2V)."""
        dtype = self.patch_embedding.weight.dtype
        ctx = self.text_embedding(self.pad_context(context, batch).to(dtype))
        if not hasattr(self, "img_emb"):
            if clip_fea is not None:
                raise ValueError(f"clip_fea was given to a {self.model_type} model without a CLIP image branch "
                                 f"(clip_dim={self.clip_dim}): pass clip_fea=None")
            return ctx, 0
        if clip_fea is None:
            raise ValueError(f"a {self.model_type} model needs clip_fea [B, 257, {self.clip_dim}]")
        clip_fea = clip_fea.reshape(batch, -1, clip_fea.shape[-1])  # FLF2V: [2B, 257, C] -> [B, 514, C]
        img = self.img_emb(clip_fea, dtype)
        return torch.cat([img, ctx], dim=1), img.shape[1]

    def patchify(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] (+ y [B, in_dim - C, F, H, W]) -> tokens [B, L, D] fp32, token grid (f, h, w)."""
        if y is not None:
            if self.model_type not in Y_TYPES:
                raise ValueError(f"y (image condition) was given to a {self.model_type} model; only "
                                 f"{Y_TYPES} take y (ti2v: the image latent goes into x, inference/ti2v.py)")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif self.model_type in Y_TYPES:
            raise ValueError(f"a {self.model_type} model needs y (mask + image latent)")
        if x.ndim != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"x (+ y) must be [B, {self.in_dim}, F, H, W], got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size, strict=True)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by patch {self.patch_size}")
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, D, f, h, w]
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2).float().contiguous(), grid

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, L, pt*ph*pw*C] (channel fastest) -> [B, C, F, H, W]."""
        (f, h, w), (pt, ph, pw) = grid, self.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw)

    def run_blocks(self, x: Tensor, e0: Tensor, context: Tensor, img_len: int, rope: Rope) -> Tensor:
        """All blocks; each is checkpointed when `gradient_checkpointing` is set and grad is enabled."""
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, e0, context, img_len, rope, use_reentrant=False)
            else:
                x = block(x, e0, context, img_len, rope)
        return x

    def forward(self, x: Tensor, t: Tensor, context: Tensor | Sequence[Tensor],
                clip_fea: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """Velocity prediction.

        x: [B, out_dim, F, H, W] noisy latent; t: [B] float in [0, 1000] (ti2v also [B, L], one per token,
        tokens ordered f, h, w as after the patch embedding: inference/ti2v.py `token_timesteps`);
        context: [B, L, text_dim] (L <= text_len, zero-padded here) or a list of [L_i, text_dim];
        I2V: clip_fea [B, 257, clip_dim] (FLF2V [B, 514, clip_dim] or [2B, 257, clip_dim]; None without a CLIP
        branch, clip_dim=None) and y [B, in_dim - out_dim, F, H, W] (mask + image latent).
        Returns v [B, out_dim, F, H, W] fp32.
        """
        batch = x.shape[0]
        tokens, grid = self.patchify(x, y)  # [B, L, D] fp32
        t = torch.as_tensor(t, device=self.device)
        per_token = t.ndim == 2  # ti2v: t [B, L]
        if per_token and t.shape[1] != tokens.shape[1]:
            raise ValueError(f"per-token t must be [B, L] with L = {tokens.shape[1]} tokens (grid {grid}), "
                             f"got {tuple(t.shape)}")
        ctx, img_len = self.embed_context(context, clip_fea, batch)  # [B, img_len + text_len, D]
        rope = self.rope(grid, tokens.device)
        if self.seq_parallel is not None:  # this rank's token shard and its RoPE rows (inference/parallel.py)
            full_rope = rope
            tokens, rope = self.seq_parallel.shard(tokens, rope)
            if per_token:  # the timesteps travel with their tokens (same pad / slice; pad tokens get t = 0)
                t = self.seq_parallel.shard(t.unsqueeze(-1), full_rope)[0].squeeze(-1)
        e, e0 = self.embed_time(t, batch)  # [B, D], [B, 6, D]; per token [B, S, D], [B, S, 6, D]
        out = self.head(self.run_blocks(tokens, e0, ctx, img_len, rope), e)  # [B, L (or shard), patch * C]
        if self.seq_parallel is not None:
            out = self.seq_parallel.gather(out)
        return self.unpatchify(out, grid).float()

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of the patch embedding); time embedding, modulation, norms and head run in fp32."""
        return self.patch_embedding.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def block_names(self) -> Iterator[str]:
        """Module names of the blocks, e.g. for FSDP wrapping or per-block offloading."""
        return (f"blocks.{i}" for i in range(len(self.blocks)))


def clip_dim_of(state: Mapping[str, Any]) -> int | None:
    """The CLIP width of an I2V DiT from its weights (official keys): `img_emb.proj.0.weight` [clip_dim] for a
    Wan2.1 I2V / FLF2V DiT, None for one without the image branch (the Wan2.2 I2V-A14B experts, whose
    config.json says model_type "i2v" like Wan2.1's). Values may be tensors or shapes."""
    weight = state.get("img_emb.proj.0.weight")
    if weight is None:
        if any("k_img" in k or k.startswith("img_emb.") for k in state):
            raise ValueError("image-branch keys (k_img / img_emb.*) without img_emb.proj.0.weight: a partial state")
        return None
    return int(tuple(getattr(weight, "shape", weight))[0])


def _check_args(model_type: str, dim: int, num_heads: int, patch_size: Sequence[int], freq_dim: int,
                clip_dim: int | None) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if model_type == "flf2v" and clip_dim is None:
        raise ValueError("an flf2v model needs clip_dim (its first/last-frame CLIP tokens); clip_dim=None is the "
                         "Wan2.2 I2V layout (model_type 'i2v')")
    if dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"dim {dim} must split into {num_heads} heads of an even size")
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must have 3 entries (t, h, w), got {patch_size}")
    if freq_dim % 2:
        raise ValueError(f"freq_dim must be even, got {freq_dim}")
