"""Wan22VAE: the Wan2.2 video VAE (TI2V-5B), key-compatible with the official `Wan2.2_VAE.pth`.

A video [B, 3, 1+4k, H, W] in [-1, 1] maps to a latent [B, 48, 1+k, H/16, W/16] (docs/wan22_vae.md). It is the
Wan2.1 causal design of models/vae.py with four changes (official repository github.com/Wan-Video/Wan2.2,
`wan/modules/vae2_2.py`):
- the pixels are patchified 2x2 first (3 -> 12 channels at half the size) and unpatchified after the decoder,
  so the three 2x downsamplings give 16x in all;
- every encoder level is one block (`downsamples.<i>.downsamples.<j>`) whose output adds a parameter-free
  "avg-down" shortcut of its input (space-to-channel by the level's strides, then the mean over groups of
  channels); every decoder level adds a "dup-up" shortcut (channels repeated, then channel-to-space);
- the decoder's upsampling convs keep the width (Wan2.1 halves it) and the decoder has its own base width
  (`dec_dim` 256; the encoder's `dim` is 160);
- z_dim 48 with its own latent mean/std (the 48 constants below, from the official `Wan2_2_VAE` class; the same
  values as diffusers' conversion script `scripts/convert_wan_to_diffusers.py`, `vae22_diffusers_config`).

The causal conv, RMS norm, residual, attention and resample blocks are those of models/vae.py, with its
`FeatureCache` chunking: the encoder runs on pixel chunks [1], [4], [4], ..., the decoder on one latent frame at
a time, and the result equals a one-shot pass. Spatial tiling (`enable_tiling`) is WanVAE's, shared. The config
read off an official file and the key map to diffusers' `AutoencoderKLWan(is_residual=True)` are in
models/vae22_keys.py.

    vae = Wan22VAE()                                     # dim 160, dec_dim 256, z_dim 48: the real size
    tiny = Wan22VAE(dim=8, dec_dim=12, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)   # CPU tests
    z = vae.encode(video)                                # (mu - mean) / std, [B, 48, 1+(T-1)/4, H/16, W/16]
    video = vae.decode(z)                                # clamped to [-1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from models.vae import (
    CausalConv3d,
    FeatureCache,
    Resample,
    ResidualBlock,
    Upsample2x,
    WanVAE,
    _head,
    _middle,
    _run,
    conv_radius,
)

WAN22_VAE_FILE = "Wan2.2_VAE.pth"  # the file name in the official Wan2.2-TI2V-5B folder

WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, T, p*h, p*w] -> [B, C*p*p, T, h, w]; channel index c*p*p + col_offset*p + row_offset (the
    official order: the column offset before the row offset)."""
    return rearrange(x, "b c t (h q) (w r) -> b (c r q) t h w", q=p, r=p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Inverse of `patchify`: [B, C*p*p, T, h, w] -> [B, C, T, p*h, p*w]."""
    return rearrange(x, "b (c r q) t h w -> b c t (h q) (w r)", q=p, r=p)


class AvgDown3d(nn.Module):
    """Parameter-free shortcut of an encoder level: [B, Cin, T, H, W] -> [B, Cout, T/ft, H/fs, W/fs].

    Space/time-to-channel by (ft, fs, fs), then the mean over each group of Cin*ft*fs*fs/Cout consecutive
    channels. A chunk whose length is not a multiple of ft gets zero frames on the left (the video's first frame
    is averaged with zeros), which keeps it causal and chunk-invariant for chunks [1], [4], [4], ...
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if in_dim * factor % out_dim:
            raise ValueError(f"AvgDown3d: in_dim {in_dim} x factor {factor} is not a multiple of out_dim {out_dim}")
        self.factor_t, self.factor_s, self.out_dim = factor_t, factor_s, out_dim

    def forward(self, x: Tensor) -> Tensor:
        pad_t = -x.shape[2] % self.factor_t
        if pad_t:
            x = torch.cat([x.new_zeros(*x.shape[:2], pad_t, *x.shape[3:]), x], dim=2)
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=self.factor_t, fh=self.factor_s,
                      fw=self.factor_s)
        return rearrange(x, "b (o g) t h w -> b o g t h w", o=self.out_dim).mean(dim=2)


class DupUp3d(nn.Module):
    """Parameter-free shortcut of a decoder level: [B, Cin, T, H, W] -> [B, Cout, T*ft, H*fs, W*fs] by repeating
    each channel Cout*ft*fs*fs/Cin times, then channel-to-space/time. On the video's first chunk the first
    ft-1 frames are dropped, as the main path's temporal upsampler passes the first frame through undoubled."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if out_dim * factor % in_dim:
            raise ValueError(f"DupUp3d: out_dim {out_dim} x factor {factor} is not a multiple of in_dim {in_dim}")
        self.factor_t, self.factor_s, self.repeats = factor_t, factor_s, out_dim * factor // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        x = rearrange(x.repeat_interleave(self.repeats, dim=1), "b (o ft fh fw) t h w -> b o (t ft) (h fh) (w fw)",
                      ft=self.factor_t, fh=self.factor_s, fw=self.factor_s)
        return x[:, :, self.factor_t - 1:] if first_chunk else x


class Resample22(Resample):
    """models/vae.py `Resample`, except that the upsampling modes keep the channel count (Wan2.1 halves it)."""

    def __init__(self, dim: int, mode: str):
        super().__init__(dim, mode)
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim, 3, padding=1))


class DownBlock(nn.Module):
    """One encoder level: `downsamples` = residual blocks (+ a Resample unless last) plus `AvgDown3d(input)`."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool, dropout: float):
        super().__init__()
        self.avg_shortcut = AvgDown3d(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        return _run(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder level: `upsamples` = residual blocks (+ a Resample22 unless last) plus `DupUp3d(input)`."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool, dropout: float):
        super().__init__()
        self.avg_shortcut = DupUp3d(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if up:
            layers.append(Resample22(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        y = _run(self.upsamples, x, cache)
        if self.avg_shortcut is None:
            return y
        first = cache is None or self not in cache.started  # `None`: this call holds the whole video
        if cache is not None:
            cache.started.add(self)
        return y + self.avg_shortcut(x, first)


class Encoder22(nn.Module):
    """conv1 (patchified pixels -> dim) -> one DownBlock per level -> middle (res, attention, res) -> head."""

    def __init__(self, in_dim: int, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_downsample: Sequence[bool], dropout: float):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(in_dim, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownBlock(a, b, num_res_blocks, i < last and bool(temporal_downsample[i]), i < last, dropout)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))))
        self.middle = _middle(dims[-1], dropout)
        self.head = _head(dims[-1], z_dim)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return _run(self.head, _run(self.middle, x, cache), cache)


class Decoder22(nn.Module):
    """conv1 (z -> dim*dim_mult[-1]) -> middle -> one UpBlock per level (num_res_blocks + 1 residual blocks)
    -> head (to `out_dim` = 3 * patch^2 channels, unpatchified by the caller)."""

    def __init__(self, dim: int, z_dim: int, out_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_upsample: Sequence[bool], dropout: float):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        self.upsamples = nn.Sequential(*(
            UpBlock(a, b, num_res_blocks + 1, i < last and bool(temporal_upsample[i]), i < last, dropout)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))))
        self.head = _head(dims[-1], out_dim)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        x = _run(self.middle, self.conv1(x, cache), cache)
        for block in self.upsamples:
            x = block(x, cache)
        return _run(self.head, x, cache)


class Wan22VAE(nn.Module):
    """The Wan2.2 video VAE with the latent codec interface of docs/CONTRACTS.md (see the module docstring).

    State dict = the official file (`encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`); `latent_mean`/`latent_std`
    are non-persistent buffers, defaulting to Wan2.2's statistics for z_dim 48 and to 0/1 otherwise.
    encode/decode take any float dtype, run in the weights' dtype and return fp32; building on `meta` and
    loading with `assign=True` works.
    """

    COMPONENT_TYPE = "wan22_vae"  # the components.json type that builds this class (models/components.py)
    tiling: tuple[int, int] | None = None  # (tile, overlap) in latent pixels: `enable_tiling`

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample: Sequence[bool] = (False, True, True),
                 patch_size: int = 2, dropout: float = 0.0, latent_mean: Sequence[float] | None = None,
                 latent_std: Sequence[float] | None = None):
        super().__init__()
        wan_stats = z_dim == len(WAN22_LATENT_MEAN)
        latent_mean = (WAN22_LATENT_MEAN if wan_stats else (0.0,) * z_dim) if latent_mean is None else latent_mean
        latent_std = (WAN22_LATENT_STD if wan_stats else (1.0,) * z_dim) if latent_std is None else latent_std
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs len(dim_mult) - 1 = {len(dim_mult) - 1} entries "
                             f"(one per downsampling level), got {list(temporal_downsample)}")
        if len(latent_mean) != z_dim or len(latent_std) != z_dim:
            raise ValueError(f"latent_mean/latent_std need z_dim={z_dim} values each, "
                             f"got {len(latent_mean)} and {len(latent_std)}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self._config = dict(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                            num_res_blocks=num_res_blocks,
                            temporal_downsample=[bool(t) for t in temporal_downsample], patch_size=patch_size,
                            dropout=dropout, latent_mean=[float(v) for v in latent_mean],
                            latent_std=[float(v) for v in latent_std])
        self.z_dim, self.patch_size = z_dim, patch_size
        self.spatial_stride = patch_size * 2 ** (len(dim_mult) - 1)
        self.temporal_stride = 2 ** sum(map(bool, temporal_downsample))
        pixels = 3 * patch_size * patch_size
        self.encoder = Encoder22(pixels, dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder22(dec_dim, z_dim, pixels, dim_mult, num_res_blocks, temporal_downsample[::-1],
                                 dropout)
        self.register_buffer("latent_mean", torch.tensor(self._config["latent_mean"]), persistent=False)
        self.register_buffer("latent_std", torch.tensor(self._config["latent_std"]), persistent=False)

    # Shared with WanVAE (same attributes, same meaning): the JSON config, the statistics as broadcastable
    # tensors, normalised encode, and the spatial tiling.
    config = WanVAE.config
    _stats = WanVAE._stats
    encode = WanVAE.encode
    enable_tiling = WanVAE.enable_tiling
    disable_tiling = WanVAE.disable_tiling
    _needs_tiles = WanVAE._needs_tiles
    _tiled = WanVAE._tiled

    latent_shape = WanVAE.latent_shape  # the same 4n+1 / multiple-of-stride rule; its error names the class

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        ref = next((v for k, v in state_dict.items() if k.startswith(prefix)), None)
        if self.latent_mean.is_meta and ref is not None and not ref.is_meta:
            # built on `meta`: materialise the statistics next to the loaded weights
            self.latent_mean = torch.tensor(self._config["latent_mean"], device=ref.device)
            self.latent_std = torch.tensor(self._config["latent_std"], device=ref.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode_mean(self, video: Tensor, chunk_sizes: Sequence[int] | None = None) -> Tensor:
        """Unnormalised posterior mean mu [B, z, 1+(T-1)/4, H/16, W/16] (fp32) of video [B, 3, T, H, W].

        The encoder runs causally on chunks of `chunk_sizes` frames (default [1, 4, 4, ...], as in Wan; any
        split whose pieces after the first are multiples of 4 gives the same result).
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"Wan22VAE.encode expects a video [B, 3, T, H, W], got {tuple(video.shape)}")
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
        x = patchify(video.to(self.conv1.weight.dtype), self.patch_size)
        cache, start, mus = FeatureCache(), 0, []
        for n in chunk_sizes:
            h = self.encoder(x[:, :, start:start + n], cache)
            mus.append(self.conv1(h)[:, :self.z_dim].float())  # first half of (mu, log_var)
            start += n
        return torch.cat(mus, dim=2)

    def decode(self, latent: Tensor, frames_per_chunk: int = 1) -> Tensor:
        """Normalised latent [B, z, F, h, w] -> video [B, 3, 1+4(F-1), 16h, 16w] in [-1, 1] (fp32), decoded
        causally `frames_per_chunk` latent frames at a time (1, as in Wan: the memory of one frame)."""
        if latent.ndim != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"Wan22VAE.decode expects a latent [B, {self.z_dim}, F, h, w], "
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
            y = self.decoder(z[:, :, start:start + frames_per_chunk], cache)
            out.append(unpatchify(y.float(), self.patch_size).clamp(-1.0, 1.0))
        return torch.cat(out, dim=2)

    def receptive_fields(self) -> tuple[int, int]:
        """(decoder field in latent pixels, encoder field in pixels), 2 * ceil(radius) + 1 as in WanVAE; the
        encoder's convs see patches of `patch_size` pixels (radius in patches x patch + the patch's own extent).
        The shortcuts stay inside their level's stride cells and add nothing."""
        dec = 2 * math.ceil(conv_radius([self.conv2, self.decoder])) + 1
        enc = 2 * math.ceil(conv_radius([self.encoder, self.conv1]) * self.patch_size + self.patch_size - 1) + 1
        return dec, enc
