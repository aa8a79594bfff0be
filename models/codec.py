"""PCACodec: a tiny linear latent codec with the Wan VAE's interface and strides.

Wan's VAE maps a video [B, 3, 1+4k, H, W] to a latent [B, z, 1+k, H/8, W/8]: the first latent frame comes from
pixel frame 0 alone (causal), each later one from a group of 4 frames. This codec does the same with two PCA
bases fitted on rendered videos: frame 0 is cut into 1x8x8x3 blocks (192 values) and every 4-frame group into
4x8x8x3 blocks (768 values); each block is projected on its `z_dim` leading principal components and each
latent channel is normalised to zero mean / unit variance (like Wan's per-channel latent mean/std). Encode and
decode are a rearrange and a matmul; decode clamps to [-1, 1].

    codec = fit_pca_codec(videos_uint8, z_dim=32)   # seconds on a CPU (scripts/fit_codec.py)
    codec.save("codec.safetensors"); codec = PCACodec.load("codec.safetensors")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from safetensors import safe_open
from torch import nn

from models.loading import write_safetensors


class PCACodec(nn.Module):
    """Linear codec; see the module docstring. Buffers: `basis0` [192, z], `basis` [768, z] (orthonormal
    columns), block means `mean0`/`mean`, latent channel statistics `lat_mean0/lat_std0` (frame 0) and
    `lat_mean/lat_std` (4-frame groups)."""

    def __init__(self, z_dim: int = 32, temporal_stride: int = 4, spatial_stride: int = 8):
        super().__init__()
        self.z_dim, self.temporal_stride, self.spatial_stride = z_dim, temporal_stride, spatial_stride
        d0 = 3 * spatial_stride**2
        d = temporal_stride * d0
        if z_dim > d0:
            raise ValueError(f"z_dim={z_dim} exceeds the {d0} values of a first-frame block")
        for name, shape in (("mean0", (d0,)), ("basis0", (d0, z_dim)), ("lat_mean0", (z_dim,)),
                            ("lat_std0", (z_dim,)), ("mean", (d,)), ("basis", (d, z_dim)),
                            ("lat_mean", (z_dim,)), ("lat_std", (z_dim,))):
            init = torch.ones(shape) if name.startswith("lat_std") else torch.zeros(shape)
            self.register_buffer(name, init)

    @property
    def config(self) -> dict[str, Any]:
        return {"z_dim": self.z_dim, "temporal_stride": self.temporal_stride, "spatial_stride": self.spatial_stride}

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z_dim, 1 + (T-1)/4, H/8, W/8), validating T = 1 + 4k and H, W multiples of 8."""
        t, s = self.temporal_stride, self.spatial_stride
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"num_frames must be 1 + {t}k (e.g. 17, 81), got {num_frames}")
        if height % s or width % s or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {s}, got {height}x{width}")
        return self.z_dim, 1 + (num_frames - 1) // t, height // s, width // s

    # -- blocks <-> video --------------------------------------------------------------------------------
    def _blocks(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.spatial_stride, self.temporal_stride
        first = rearrange(video[:, :, :1], "b c f (h p) (w q) -> b f h w (p q c)", p=s, q=s)
        rest = rearrange(video[:, :, 1:], "b c (f t) (h p) (w q) -> b f h w (t p q c)", t=t, p=s, q=s)
        return first, rest

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent [B, z, 1+k, H/8, W/8] (float32)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])
        first, rest = self._blocks(video.to(self.basis.device, torch.float32))
        z0 = ((first - self.mean0) @ self.basis0 - self.lat_mean0) / self.lat_std0  # (B, 1, h, w, z)
        z = ((rest - self.mean) @ self.basis - self.lat_mean) / self.lat_std  # (B, k, h, w, z)
        return rearrange(torch.cat([z0, z], 1), "b f h w z -> b z f h w")

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, z, 1+k, h, w] -> video [B, 3, 1+4k, 8h, 8w] in [-1, 1] (float32, clamped)."""
        if latent.ndim != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"expected latent [B, {self.z_dim}, f, h, w], got {tuple(latent.shape)}")
        s, t = self.spatial_stride, self.temporal_stride
        z = rearrange(latent.to(self.basis.device, torch.float32), "b z f h w -> b f h w z")
        first = (z[:, :1] * self.lat_std0 + self.lat_mean0) @ self.basis0.T + self.mean0
        rest = (z[:, 1:] * self.lat_std + self.lat_mean) @ self.basis.T + self.mean
        first = rearrange(first, "b f h w (p q c) -> b c f (h p) (w q)", p=s, q=s, c=3)
        rest = rearrange(rest, "b f h w (t p q c) -> b c (f t) (h p) (w q)", t=t, p=s, q=s, c=3)
        return torch.cat([first, rest], 2).clamp(-1, 1)

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """safetensors with the config in the metadata (atomic write)."""
        return write_safetensors(self.state_dict(), path, metadata={"config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> PCACodec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"codec file not found: {path} (write one with scripts/fit_codec.py)")
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "config" not in meta:
            raise ValueError(f"{path}: no codec config in the safetensors metadata")
        codec = cls(**json.loads(meta["config"]))
        codec.load_state_dict(state, strict=True)
        return codec


def videos_to_tensor(videos: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, F, H, W, 3] -> float32 [N, 3, F, H, W] in [-1, 1]."""
    v = torch.as_tensor(np.asarray(videos))
    if v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos [N, F, H, W, 3], got {v.dtype} {tuple(v.shape)}")
    return v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def tensor_to_videos(video: torch.Tensor) -> np.ndarray:
    """float [N, 3, F, H, W] in [-1, 1] -> uint8 [N, F, H, W, 3]."""
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def _pca(blocks: list[torch.Tensor], n_blank: int, z_dim: int) -> tuple[torch.Tensor, ...]:
    """Mean, `z_dim` leading eigenvectors of the block covariance and the std of each projection.

    `blocks` are the non-blank blocks; `n_blank` all-black blocks (value -1) are added analytically, which
    makes the fit ~10x cheaper on the mostly black shapes world without changing the result.
    """
    blank = torch.full((blocks[0].shape[1],), -1.0, dtype=torch.float64)
    n = sum(b.shape[0] for b in blocks) + n_blank
    mean = (sum(b.double().sum(0) for b in blocks) + n_blank * blank) / n
    d = (blank - mean)[:, None]
    m32 = mean.float()
    cov = (sum(((b - m32).T @ (b - m32)).double() for b in blocks) + n_blank * d @ d.T) / n
    # SVD of the symmetric PSD covariance = its eigendecomposition, sorted descending. fp32: torch's fp64
    # eigh/svd take ~10 s for 768x768 on some CPU builds, fp32 svd < 1 s.
    u, s, _ = torch.linalg.svd(cov.float())
    basis = u[:, :z_dim] * torch.where(u[:, :z_dim].sum(0) < 0, -1.0, 1.0)  # deterministic signs
    # projections of centred blocks have mean 0 and variance = the eigenvalues
    return m32, basis, s[:z_dim].clamp_min(1e-12).sqrt()


@torch.no_grad()
def fit_pca_codec(videos: np.ndarray | torch.Tensor, z_dim: int = 32, spatial_stride: int = 8,
                  normalize: str = "channel", chunk: int = 64) -> PCACodec:
    """Fit a `PCACodec` on uint8 videos [N, 1+4k, H, W, 3] (exact covariance over all blocks + SVD; seconds).

    normalize="channel": every latent channel gets unit variance (Wan's per-channel latent std).
    normalize="global": one std for all channels (their mean variance is 1), so the latent keeps PCA's
    energy ordering and the latent MSE is the pixel MSE up to one constant (the basis is orthonormal): a
    diffusion model trained on it spends its loss on the components that matter in pixels, and the
    low-energy detail components are drowned by noise earlier than the coarse ones (coarse-to-fine).
    """
    if normalize not in ("channel", "global"):
        raise ValueError(f"normalize must be 'channel' or 'global', got {normalize!r}")
    codec = PCACodec(z_dim, spatial_stride=spatial_stride)
    kept: dict[str, list[torch.Tensor]] = {"first": [], "rest": []}
    blank = {"first": 0, "rest": 0}
    for i in range(0, len(videos), chunk):
        for name, b in zip(kept, codec._blocks(videos_to_tensor(videos[i:i + chunk])), strict=True):
            b = b.reshape(-1, b.shape[-1])
            is_blank = (b == -1).all(1)
            kept[name].append(b[~is_blank])
            blank[name] += int(is_blank.sum())
    if sum(b.shape[0] for b in kept["rest"]) + blank["rest"] == 0:
        raise ValueError("fit_pca_codec needs videos with at least 5 frames")
    for name, suffix in (("first", "0"), ("rest", "")):
        if sum(b.shape[0] for b in kept[name]) == 0:
            raise ValueError("fit_pca_codec needs videos with some non-black content")
        mean, basis, std = _pca(kept[name], blank[name], z_dim)
        setattr(codec, f"mean{suffix}", mean)
        setattr(codec, f"basis{suffix}", basis)
        setattr(codec, f"lat_mean{suffix}", torch.zeros(z_dim))
        if normalize == "global":
            std = std.pow(2).mean().sqrt().expand(z_dim).clone()
        setattr(codec, f"lat_std{suffix}", std.clamp_min(1e-6))
    return codec
