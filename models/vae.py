"""WanVAE: the Wan2.1 causal 3D video VAE, key-compatible with the official `Wan2.1_VAE.pth`.

A video [B, 3, 1+4k, H, W] in [-1, 1] maps to a latent [B, 16, 1+k, H/8, W/8] (docs/wan_architecture.md, "VAE").
Every conv
is causal in time (padded on the left only), so latent frame 0 depends on pixel frame 0 alone and latent frame
j on pixel frames <= 4j. The encoder therefore runs on chunks of frames [1], [4], [4], ... and the decoder on
one latent frame at a time; a `FeatureCache` carries the few frames of left context each causal conv needs
from one chunk to the next, so memory stays flat in the video length and the result equals a one-shot pass.

The state dict is the official one (a plain dict of the inner `WanVAE_` module: `encoder.*`, `conv1.*`,
`conv2.*`, `decoder.*`; 194 tensors, 126.9M parameters at the default size). The latent mean/std are
non-persistent buffers. `models.convert.to_diffusers_vae_state_dict` / `from_diffusers_vae_state_dict` rename
the keys to and from diffusers' `AutoencoderKLWan` (the parity reference in tests/test_vae.py).

    vae = WanVAE()                                       # dim 96, z_dim 16: the real size
    tiny = WanVAE(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)   # CPU tests
    z = vae.encode(video)                                # (mu - mean) / std, [B, 16, 1+(T-1)/4, H/8, W/8]
    video = vae.decode(z)                                # clamped to [-1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.tiling import tiled_apply

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class FeatureCache:
    """Causal state of one video while it is processed chunk by chunk.

    `frames[m]`: the last input frames that causal conv (or temporal downsampler) `m` needs as left context
    for the next chunk. `started`: the temporal resamplers that have already seen the video's first frame
    (which they pass through unchanged). A fresh cache per video and per encode/decode; `None` instead of a
    cache means "this call holds the whole video".
    """

    def __init__(self) -> None:
        self.frames: dict[nn.Module, Tensor] = {}
        self.started: set[nn.Module] = set()


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time by 2 * padding_t frames on the left only: output frame t sees inputs <= t.

    With a cache, the left context is the previous chunk's last frames instead of zeros.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, pad[1], pad[2]))
        self.time_pad = 2 * pad[0]

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.time_pad:
            prev = None if cache is None else cache.frames.get(self)
            if prev is None:  # start of the video: zeros
                prev = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([prev, x], dim=2)  # (B, C, pad + T, H, W)
            if cache is not None:
                cache.frames[self] = x[:, :, -self.time_pad:].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """Normalise over channels (dim 1) to unit RMS, times a learnt per-channel `gamma` (no bias)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling of [N, C, H, W], computed in fp32 (bf16 support)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """2x spatial down/upsampling per frame; the `3d` modes also halve/double the frames after frame 0.

    downsample3d: spatial conv (stride 2), then a temporal conv (k 3, stride 2, no padding) over
    [previous chunk's last frame, this chunk]; the video's first frame passes through.
    upsample3d: a causal temporal conv makes 2C channels = two frames per input frame; the video's first frame
    passes through undoubled (so 1+k frames -> 1+2k), then spatial 2x upsample and a conv to C/2 channels.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right/bottom by one so a stride-2 3x3 conv halves even sizes exactly
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _first_chunk(self, cache: FeatureCache | None) -> bool:
        if cache is None:
            return True
        first = self not in cache.started
        cache.started.add(self)
        return first

    def _double_frames(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        head = None
        if self._first_chunk(cache):
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            x = self.time_conv(x, cache)  # (B, 2C, T, H, W)
            x = rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)
        return x if head is None else torch.cat([head, x], dim=2)

    def _halve_frames(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        if self._first_chunk(cache):
            head, context = [x[:, :, :1]], x
        else:
            head, context = [], torch.cat([cache.frames[self], x], dim=2)
        if cache is not None:
            cache.frames[self] = x[:, :, -1:].clone()
        body = [self.time_conv(context)] if context.shape[2] >= 3 else []
        return torch.cat(head + body, dim=2)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        t = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.resample(x)
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x


class ResidualBlock(nn.Module):
    """x + residual(x): (RMSNorm, SiLU, CausalConv3d 3x3x3) twice, dropout before the second conv."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (so still causal)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, as in the official code

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h))
        return x + rearrange(y, "(b t) c h w -> b c t h w", t=t)


_CACHED = (CausalConv3d, Resample, ResidualBlock, AttentionBlock)


def _run(layers: Iterable[nn.Module], x: Tensor, cache: FeatureCache | None) -> Tensor:
    """Apply `layers` in order, handing the cache to the ones that are causal in time."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _CACHED) else layer(x)
    return x


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim),
                         ResidualBlock(dim, dim, dropout))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    """conv1 -> per level: res blocks (+attention at `attn_scales`), 2x downsample (not after the last level)
    -> middle (res, attention, res) -> head (norm, SiLU, conv to `z_dim` channels)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temporal_downsample: Sequence[bool], dropout: float):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1], dropout)
        self.head = _head(dims[-1], z_dim)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for layers in (self.downsamples, self.middle, self.head):
            x = _run(layers, x, cache)
        return x


class Decoder3d(nn.Module):
    """conv1 -> middle -> per level: num_res_blocks+1 res blocks (+attention), 2x upsample that also halves
    the channels (not after the last level) -> head (norm, SiLU, conv to RGB)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temporal_upsample: Sequence[bool], dropout: float):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim //= 2  # the previous level's upsample conv halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for layers in (self.middle, self.upsamples, self.head):
            x = _run(layers, x, cache)
        return x


class WanVAE(nn.Module):
    """The Wan2.1 video VAE with the latent codec interface of docs/CONTRACTS.md (see the module docstring).

    `latent_mean`/`latent_std` default to Wan2.1's statistics for z_dim 16 and to 0/1 (no normalisation) for
    other widths. encode/decode take any float dtype, run in the weights' dtype and return fp32. Building on
    the `meta` device and loading with `load_state_dict(..., assign=True)` works: the non-persistent latent
    mean/std are rebuilt from the config on load.
    """

    tiling: tuple[int, int] | None = None  # (tile, overlap) in latent pixels: `enable_tiling`

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                 temporal_downsample: Sequence[bool] = (False, True, True), dropout: float = 0.0,
                 latent_mean: Sequence[float] | None = None, latent_std: Sequence[float] | None = None):
        super().__init__()
        wan_stats = z_dim == len(WAN21_LATENT_MEAN)
        if latent_mean is None:
            latent_mean = WAN21_LATENT_MEAN if wan_stats else (0.0,) * z_dim
        if latent_std is None:
            latent_std = WAN21_LATENT_STD if wan_stats else (1.0,) * z_dim
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs len(dim_mult) - 1 = {len(dim_mult) - 1} entries "
                             f"(one per downsampling level), got {list(temporal_downsample)}")
        if len(latent_mean) != z_dim or len(latent_std) != z_dim:
            raise ValueError(f"latent_mean/latent_std need z_dim={z_dim} values each, "
                             f"got {len(latent_mean)} and {len(latent_std)}")
        self._config = dict(dim=dim, z_dim=z_dim, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                            attn_scales=list(attn_scales),
                            temporal_downsample=[bool(t) for t in temporal_downsample],
                            dropout=dropout, latent_mean=[float(v) for v in latent_mean],
                            latent_std=[float(v) for v in latent_std])
        self.z_dim = z_dim
        self.spatial_stride = 2 ** (len(dim_mult) - 1)
        self.temporal_stride = 2 ** sum(map(bool, temporal_downsample))

        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales, temporal_downsample,
                                 dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample[::-1],
                                 dropout)
        self.register_buffer("latent_mean", torch.tensor(self._config["latent_mean"]), persistent=False)
        self.register_buffer("latent_std", torch.tensor(self._config["latent_std"]), persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly): `WanVAE(**vae.config)` rebuilds the same network."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        ref = next((v for k, v in state_dict.items() if k.startswith(prefix)), None)
        if self.latent_mean.is_meta and ref is not None and not ref.is_meta:
            # built on `meta`: materialise the statistics next to the loaded weights
            self.latent_mean = torch.tensor(self._config["latent_mean"], device=ref.device)
            self.latent_std = torch.tensor(self._config["latent_std"], device=ref.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z_dim, 1 + (T-1)/ts, H/s, W/s) for ts = temporal_stride (4), s = spatial_stride (8; Wan22VAE 16); ValueError
        naming the offending values unless T = ts*n + 1 and H, W are multiples of s."""
        ts, s = self.temporal_stride, self.spatial_stride
        problems = []
        if num_frames < 1 or (num_frames - 1) % ts:
            problems.append(f"num_frames must be {ts}n+1 (1, {ts + 1}, {2 * ts + 1}, ...), got {num_frames}")
        for name, value in (("height", height), ("width", width)):
            if value < s or value % s:
                problems.append(f"{name} must be a positive multiple of {s}, got {value}")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        return self.z_dim, 1 + (num_frames - 1) // ts, height // s, width // s

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        return (self.latent_mean.to(x.device, torch.float32).view(shape),
                self.latent_std.to(x.device, torch.float32).view(shape))

    def encode_mean(self, video: Tensor, chunk_sizes: Sequence[int] | None = None) -> Tensor:
        """Unnormalised posterior mean mu [B, z, 1+(T-1)/4, H/8, W/8] (fp32).

        The encoder runs causally on chunks of `chunk_sizes` frames (default [1, 4, 4, ...], as in Wan; any
        split whose pieces after the first are multiples of 4 gives the same result).
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"WanVAE.encode expects a video [B, 3, T, H, W], got {tuple(video.shape)}")
        t = video.shape[2]
        self.latent_shape(t, video.shape[3], video.shape[4])
        if chunk_sizes is None:
            chunk_sizes = [1] + [self.temporal_stride] * ((t - 1) // self.temporal_stride)
        if sum(chunk_sizes) != t:
            raise ValueError(f"chunk_sizes {list(chunk_sizes)} sum to {sum(chunk_sizes)}, not T={t}")
        if self._needs_tiles(video.shape[-2] // self.spatial_stride, video.shape[-1] // self.spatial_stride):
            return self._tiled(lambda v: self._encode_mean(v, chunk_sizes), video, self.spatial_stride, 1)
        return self._encode_mean(video, chunk_sizes)

    def _encode_mean(self, video: Tensor, chunk_sizes: Sequence[int]) -> Tensor:
        """The encoder over all of `video` (no tiling), chunk by chunk in time."""
        x = video.to(self.conv1.weight.dtype)
        cache, start, mus = FeatureCache(), 0, []
        for n in chunk_sizes:
            h = self.encoder(x[:, :, start:start + n], cache)
            mus.append(self.conv1(h)[:, :self.z_dim].float())  # first half of (mu, log_var)
            start += n
        return torch.cat(mus, dim=2)

    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised mean latent (mu - mean) / std (fp32)."""
        mu = self.encode_mean(video)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, latent: Tensor, frames_per_chunk: int = 1) -> Tensor:
        """Normalised latent [B, z, F, h, w] -> video [B, 3, 1+4(F-1), 8h, 8w] in [-1, 1] (fp32), decoded
        causally `frames_per_chunk` latent frames at a time (1, as in Wan: the memory of one frame)."""
        if latent.ndim != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"WanVAE.decode expects a latent [B, {self.z_dim}, F, h, w], "
                             f"got {tuple(latent.shape)}")
        if self._needs_tiles(latent.shape[-2], latent.shape[-1]):
            return self._tiled(lambda z: self._decode(z, frames_per_chunk), latent, 1, self.spatial_stride)
        return self._decode(latent, frames_per_chunk)

    def _decode(self, latent: Tensor, frames_per_chunk: int) -> Tensor:
        """The decoder over all of `latent` (no tiling), `frames_per_chunk` latent frames at a time."""
        mean, std = self._stats(latent)
        z = self.conv2((latent.float() * std + mean).to(self.conv1.weight.dtype))
        cache, out = FeatureCache(), []
        for start in range(0, z.shape[2], frames_per_chunk):
            out.append(self.decoder(z[:, :, start:start + frames_per_chunk], cache).float().clamp(-1.0, 1.0))
        return torch.cat(out, dim=2)

    # ---- spatial tiling (use_tiling_vae; helpers below the class) -------------------------------------------
    def receptive_fields(self) -> tuple[int, int]:
        """(decoder field in latent pixels, encoder field in pixels): the widest window one output value can see
        through the convolutions, 2 * ceil(radius) + 1. The middle attention is global within a frame: tiles
        approximate it with their own pixels (the documented tolerance of tiled vs untiled)."""
        dec = 2 * math.ceil(conv_radius([self.conv2, self.decoder])) + 1
        enc = 2 * math.ceil(conv_radius([self.encoder, self.conv1])) + 1
        return dec, enc

    def enable_tiling(self, tile: int = 48, overlap: int = 16) -> None:
        """Decode (and encode) in spatial tiles of `tile` latent pixels (x spatial_stride in pixels) that share
        `overlap` latent pixels with their neighbours, blended linearly; each tile runs the usual causal chunks
        in time. A tile smaller than the decoder's or the encoder's receptive field is a ValueError naming it."""
        dec, enc = self.receptive_fields()
        s = self.spatial_stride
        if tile < dec or tile * s < enc:
            raise ValueError(f"VAE tile of {tile} latent pixels ({tile * s} pixels) is smaller than the receptive "
                             f"field of the decoder ({dec} latent pixels) or the encoder ({enc} pixels): a tile must "
                             f"be at least {max(dec, -(-enc // s))} latent pixels")
        if not 0 <= overlap < tile:
            raise ValueError(f"VAE tile overlap must be in [0, tile={tile}) latent pixels, got {overlap}")
        self.tiling = (int(tile), int(overlap))

    def disable_tiling(self) -> None:
        self.tiling = None

    def _needs_tiles(self, h: int, w: int) -> bool:
        return self.tiling is not None and max(h, w) > self.tiling[0]

    def _tiled(self, fn, x: Tensor, in_mult: int, out_mult: int) -> Tensor:
        """fn over overlapping spatial tiles of x, blended (models/tiling.py `tiled_apply`)."""
        return tiled_apply(fn, x, *self.tiling, in_mult, out_mult)

def conv_radius(modules: Iterable[nn.Module]) -> float:
    """Spatial receptive radius, in input pixels, of convolutions applied in the modules' registration order
    (which is their forward order in this VAE): a k-wide conv adds (k - 1) / 2 input steps (a strided one its full
    width k - 1, it is padded on one side), 2x upsampling halves the step, a stride-2 conv doubles it."""
    radius, step = 0.0, 1.0
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                k, d, stride = m.kernel_size[-1], m.dilation[-1], m.stride[-1]
                radius += (k - 1) * d * step * (1.0 if stride > 1 else 0.5)
                step *= stride
            elif isinstance(m, Upsample2x):
                step /= 2
    return radius
