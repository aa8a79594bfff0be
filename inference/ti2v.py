"""Wan2.2 TI2V-5B image conditioning as pure functions (docs/wan22_dit.md, "TI2V-5B").

TI2V has no y input and no CLIP: the VAE latent of the start image *replaces* latent frame 0 of the video, and
the DiT is told which tokens are clean through per-token timesteps (0 on the image tokens, t on the others):

    mask         = first_frame_mask(f, h, w)                    [1, 1, f, h, w]   0 on frame 0, 1 elsewhere
    x_in         = blend_first_frame(x, image_latent, mask)     mask * x + (1 - mask) * image_latent
    t_tokens     = token_timesteps(t, mask, patch)              [B, L]            t * mask, one value per token
    v            = dit(x_in, t_tokens, context)                 (models/wan_model.py, model_type "ti2v")
    final latent = blend_first_frame(x_final, image_latent, mask)

`ti2v_denoiser` wraps any (x, t) denoiser of the sampler into one that does the first three lines. Wan2.2 blends
the sampler state itself after every step (wan/textimage2video.py); blending the DiT's input instead, and the
result once at the end (what diffusers' Wan pipelines do with `expand_timesteps`), gives the same video for the
per-element flow schedulers (Euler, UniPC, the distill one): the state's frame-0 entries are never read by the
DiT and never mix with the other entries; tests/test_wan22_dit.py checks this against the per-step blend.
T2V with the same model needs none of this: one timestep per sample (t [B]) is the Wan2.1 path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x [B, C, F, H, W], t) -> v [B, C, F, H, W]


def first_frame_mask(frames: int, height: int, width: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """The TI2V latent mask [1, 1, frames, height, width] (latent sizes): 0 on latent frame 0, which holds the
    clean image latent, 1 on the frames to generate. Broadcasts over batch and channels (Wan's `masks_like`
    with zero=True keeps a copy per channel; every channel is the same)."""
    if min(frames, height, width) < 1:
        raise ValueError(f"latent size must be positive, got (f, h, w) = ({frames}, {height}, {width})")
    mask = torch.ones(1, 1, frames, height, width, device=device, dtype=dtype)
    mask[:, :, 0] = 0
    return mask


def _check_mask(mask: Tensor, latent: Tensor | None = None) -> None:
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [1 or B, 1, F, H, W] (first_frame_mask), got {tuple(mask.shape)}")
    if latent is not None and (latent.ndim != 5 or tuple(mask.shape[2:]) != tuple(latent.shape[2:])
                               or mask.shape[0] not in (1, latent.shape[0])):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the latent {tuple(latent.shape)}: expected "
                         f"[1 or B, 1, F, H, W] with the latent's F, H, W")


def blend_first_frame(x: Tensor, image_latent: Tensor, mask: Tensor) -> Tensor:
    """mask * x + (1 - mask) * image_latent: the latent with frame 0 replaced by the clean image latent.

    x: [B, C, F, H, W]; image_latent: [B, C, 1, H, W] (the VAE latent of the image alone; broadcast over frames)
    or [B, C, F, H, W]; mask: [1 or B, 1, F, H, W] of 0/1 -> [B, C, F, H, W] in x's dtype.
    """
    _check_mask(mask, x)
    if (image_latent.ndim != 5 or image_latent.shape[:2] != x.shape[:2] or image_latent.shape[3:] != x.shape[3:]
            or image_latent.shape[2] not in (1, x.shape[2])):
        raise ValueError(f"image_latent must be [B, C, 1 or F, H, W] = [{x.shape[0]}, {x.shape[1]}, 1, "
                         f"{x.shape[3]}, {x.shape[4]}], got {tuple(image_latent.shape)}")
    m = mask.to(x.dtype)
    return (1 - m) * image_latent.to(x.dtype) + m * x  # Wan's order of terms; exact for a 0/1 mask


def token_timesteps(t: Tensor | float, mask: Tensor, patch_size: Sequence[int] = (1, 2, 2),
                    batch: int | None = None) -> Tensor:
    """Per-token timesteps [B, L] from the step's timestep and the latent mask.

    t: [B] (or a scalar, then `batch` or the mask's batch gives B); mask: [1 or B, 1, F, H, W];
    L = (F/pt)(H/ph)(W/pw) tokens in the DiT's order (f, h, w, w fastest). A token's value is t * mask at its
    patch: t for tokens to generate, 0 for the clean first-frame tokens (Wan2.2 reads the mask at each patch's
    first element, mask[..., ::pt, ::ph, ::pw]; the mask must be constant inside a patch).
    """
    _check_mask(mask)
    pt, ph, pw = (int(p) for p in patch_size)
    f, h, w = mask.shape[2:]
    if f % pt or h % ph or w % pw:
        raise ValueError(f"mask size {(f, h, w)} is not divisible by the patch {tuple(patch_size)}")
    m = mask[:, 0, ::pt, ::ph, ::pw]  # [1 or B, f/pt, h/ph, w/pw]
    coarse = m.repeat_interleave(pt, 1).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    if not torch.equal(coarse, mask[:, 0]):
        raise ValueError("the mask varies inside a patch; TI2V masks whole latent frames (first_frame_mask)")
    t = torch.as_tensor(t, device=mask.device)
    t = t.reshape(-1).float() if not t.is_floating_point() else t.reshape(-1)
    b = batch if batch is not None else (mask.shape[0] if t.numel() == 1 else t.numel())
    if t.numel() == 1:
        t = t.expand(b)
    if t.shape != (b,) or mask.shape[0] not in (1, b):
        raise ValueError(f"t must be a scalar or [B] with B = {b} and the mask [1 or B, ...], got t "
                         f"{tuple(t.shape)} and mask {tuple(mask.shape)}")
    return t[:, None] * m.flatten(1).to(t.dtype)  # [B, L]


def ti2v_denoiser(denoise: Denoiser, image_latent: Tensor, mask: Tensor,
                  patch_size: Sequence[int] = (1, 2, 2)) -> Denoiser:
    """Wrap a sampler denoiser into the TI2V image-conditioned one.

    denoise(x_in [B, C, F, H, W], t_tokens [B, L]) -> v: the pipeline's denoiser (inference/pipeline.py
    `make_denoiser`: CFG inside; it hands t to the DiT unchanged, [cond; uncond] concatenates it along the
    batch). image_latent: [B, C, 1, H, W] clean VAE latent of the start image; mask: first_frame_mask(F, H, W).
    Returns d(x [B, C, F, H, W], t [B]) -> v [B, C, F, H, W]; v on frame 0 is meaningless (the blend discards
    it): blend the sampler's final latent with `blend_first_frame` before decoding.
    """
    _check_mask(mask)

    def denoise_ti2v(x: Tensor, t: Tensor) -> Tensor:
        x_in = blend_first_frame(x, image_latent, mask)
        return denoise(x_in, token_timesteps(t, mask.to(x.device), patch_size, batch=x.shape[0]))

    return denoise_ti2v
