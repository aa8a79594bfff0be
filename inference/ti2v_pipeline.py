"""Wan2.2 TI2V-5B generation: one dense DiT that makes a video from text alone (T2V) or from text and a start
image (I2V), over the Wan2.2 VAE's 48-channel latent (docs/wan22_ti2v.md).

`TI2VPipeline` is a `WanPipeline` (same `generate`, same overrides, offload, LoRAs, CFG, schedulers); it changes
what the image does:

- T2V (task "t2v"): the Wan2.1 path exactly, one timestep per sample (t [B]); no mask, no image.
- I2V (task "i2v"): the image is resized and center-cropped to the output size Wan2.2 picks for its aspect ratio
  (`best_output_size`, sides multiples of VAE stride 16 x patch 2 = 32, area <= target_height x target_width),
  encoded alone to `image_latent` [B, 48, 1, h, w]; every DiT call sees latent frame 0 replaced by it, with
  timestep 0 on its tokens and t elsewhere (inference/ti2v.py `ti2v_denoiser`); the final latent gets frame 0
  replaced once more before decoding (`final_latent`). No CLIP, no y.

The task is per call (`generate(..., task="i2v", image=...)`), as LightX2V runs the same folder with
`--model_cls wan2.2 --task t2v|i2v`. `check_ti2v_request(cfg, folder)` is the loader's preflight: it says whether
the folder / model_cls pair is TI2V and names what does not fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from inference.config import InferConfig
from inference.pipeline import WanPipeline
from inference.ti2v import blend_first_frame, first_frame_mask, ti2v_denoiser
from models.loading import DIT_CONFIG

TI2V_MODEL_CLS = "wan2.2"  # LightX2V's --model_cls of the dense Wan2.2 model (TI2V-5B)
TI2V_MODEL_TYPE = "ti2v"  # model_type in the DiT's config.json


def best_output_size(width: int, height: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """The (width, height) Wan2.2 generates for an image of `width` x `height`: multiples of (dw, dh), area at
    most `area`, aspect ratio as close as possible to the image's (Wan2.2 wan/utils/utils.py `best_output_size`:
    the candidates rounded width-first and height-first, the one with the smaller ratio error wins, ties to the
    height-first one)."""
    if min(width, height, dw, dh) < 1 or area < dw * dh:
        raise ValueError(f"best_output_size needs positive sizes and area >= dw * dh, got image {width}x{height}, "
                         f"multiples ({dw}, {dh}), area {area}")
    ratio = width / height
    ow, oh = (area * ratio) ** 0.5, (area / ratio) ** 0.5
    candidates = []
    w1 = max(dw, int(ow // dw * dw))  # width first
    candidates.append((w1, max(dh, int(area / w1 // dh * dh))))
    h2 = max(dh, int(oh // dh * dh))  # height first
    candidates.append((max(dw, int(area / h2 // dw * dw)), h2))

    def error(wh: tuple[int, int]) -> float:
        r = wh[0] / wh[1]
        return max(ratio / r, r / ratio)

    return candidates[0] if error(candidates[0]) < error(candidates[1]) else candidates[1]


def fit_image(images: Tensor, height: int, width: int) -> Tensor:
    """images [B, 3, H, W] in [-1, 1] -> [B, 3, height, width]: scaled to cover the target (the larger of the two
    scale factors, sizes rounded), then center-cropped, as Wan2.2's TI2V preprocessing. Resampling is bicubic
    with antialiasing (Wan2.2 uses PIL's Lanczos: the pixels differ slightly, the geometry is the same)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    ih, iw = images.shape[-2:]
    scale = max(width / iw, height / ih)
    rh, rw = max(height, round(ih * scale)), max(width, round(iw * scale))
    out = images.float()
    if (rh, rw) != (ih, iw):
        out = F.interpolate(out, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    top, left = (rh - height) // 2, (rw - width) // 2
    return out[:, :, top:top + height, left:left + width]


def folder_model_type(folder: str | Path) -> str | None:
    """model_type of the DiT in an official-layout folder's config.json (None: no config.json at the top)."""
    path = Path(folder) / DIT_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("model_type")
    except (ValueError, AttributeError):
        return None  # the loader names a broken config.json


def check_ti2v_request(cfg: InferConfig, folder: str | Path) -> bool:
    """Whether `cfg` + `folder` is a TI2V-5B run; ValueError when model_cls and the folder's DiT disagree or the
    size cannot be generated. Reads config.json only (no weights)."""
    model_type = folder_model_type(folder)
    wants = cfg.model_cls == TI2V_MODEL_CLS
    if not wants and model_type != TI2V_MODEL_TYPE:
        return False
    if wants and model_type != TI2V_MODEL_TYPE:
        found = f"a {model_type!r} DiT" if model_type else "no official config.json at its top"
        raise ValueError(f"model_cls 'wan2.2' runs Wan2.2 TI2V-5B (a DiT with model_type 'ti2v'), but {folder} has "
                         f"{found}: use model_cls 'wan2.1' / 'wan2.1_distill' for Wan2.1 folders and 'wan2.2_moe' "
                         "for the A14B expert folders")
    if not wants:
        raise ValueError(f"{folder} holds Wan2.2 TI2V-5B (model_type 'ti2v'): set model_cls 'wan2.2' "
                         f"(--model_cls wan2.2, LightX2V's name; got {cfg.model_cls!r}), with task t2v or i2v")
    check_ti2v_size(cfg.target_height, cfg.target_width)
    return True


def check_ti2v_size(height: int, width: int, multiple: int = 32) -> None:
    """TI2V-5B's sizes: multiples of 32 (VAE stride 16 x DiT patch 2), e.g. 704 x 1280."""
    bad = [f"{n} {v}" for n, v in (("target_height", height), ("target_width", width)) if v % multiple]
    if bad:
        raise ValueError(f"Wan2.2 TI2V-5B needs target_height and target_width multiples of {multiple} (VAE stride "
                         f"16 x patch 2; its sizes are 704x1280 and 1280x704), got {', '.join(bad)}")


class TI2VPipeline(WanPipeline):
    """Wan2.2 TI2V-5B: `WanPipeline` with the first-frame image conditioning (see the module docstring)."""

    def __init__(self, cfg: InferConfig, dit, vae, text_encoder, image_encoder=None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, offload=None,
                 experts_offloaded: bool = False) -> None:
        if getattr(dit, "model_type", None) != TI2V_MODEL_TYPE:
            raise ValueError(f"TI2VPipeline needs a Wan2.2 TI2V DiT (model_type 'ti2v'), got "
                             f"{getattr(dit, 'model_type', type(dit).__name__)!r}")
        if image_encoder is not None:
            raise ValueError("TI2V-5B takes no CLIP image encoder: the image enters as its VAE latent on frame 0")
        if vae.z_dim != dit.in_dim:
            raise ValueError(f"the VAE's latent has {vae.z_dim} channels, the TI2V DiT takes {dit.in_dim}: TI2V-5B "
                             "needs the Wan2.2 VAE (Wan2.2_VAE.pth, 48 channels)")
        super().__init__(cfg, dit, vae, text_encoder, None, device, dtype, offload, experts_offloaded)

    def latent_size(self, cfg: InferConfig, image: Tensor | None) -> tuple[int, int, int, int]:
        """(z, f, h, w). T2V: target_height x target_width (multiples of 32). I2V: `best_output_size` of the
        image's aspect ratio within the area target_height x target_width."""
        check_ti2v_size(cfg.target_height, cfg.target_width)
        s = self.vae.spatial_stride
        _, ph, pw = self.dit.patch_size
        if image is None:
            return self.vae.latent_shape(cfg.target_video_length, cfg.target_height, cfg.target_width)
        ih, iw = image.shape[-2:]
        ow, oh = best_output_size(iw, ih, s * pw, s * ph, cfg.target_height * cfg.target_width)
        return self.vae.latent_shape(cfg.target_video_length, oh, ow)

    def encode_image(self, images: Tensor, shape: tuple[int, int, int, int]) -> tuple[None, Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (None, image_latent [B, z, 1, h, w] fp32): the image fitted to the
        latent's pixel size and encoded alone (one frame). The latent stays fp32: it is blended into the fp32
        sampler state."""
        _, _, h, w = shape
        s = self.vae.spatial_stride
        img = fit_image(images.to(self.device), h * s, w * s)
        return None, self.vae.encode(img[:, :, None]).float()

    def make_denoiser(self, cond: Tensor, uncond: Tensor | None, guidance, clip_fea: Tensor | None,
                      y: Tensor | None, guided=None, plan=None):
        """WanPipeline's denoiser; with an image latent `y` [B, z, 1, h, w] wrapped by `ti2v_denoiser` (frame 0
        replaced by the image latent, per-token timesteps [B, L] with 0 on its tokens)."""
        if clip_fea is not None:
            raise ValueError("TI2V-5B takes no CLIP features (clip_fea must be None)")
        inner = super().make_denoiser(cond, uncond, guidance, None, None, guided, plan)
        if y is None:
            return inner
        wrapped: dict[tuple[int, ...], object] = {}  # the mask needs the latent's frame count: from x

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            if x.shape[2:] not in wrapped:
                wrapped[x.shape[2:]] = ti2v_denoiser(inner, y, first_frame_mask(*x.shape[2:], device=x.device),
                                                     self.dit.patch_size)
            return wrapped[x.shape[2:]](x, t)

        return denoise

    def final_latent(self, latent: Tensor, y: Tensor | None) -> Tensor:
        """The sampled latent [B, z, f, h, w] with frame 0 replaced by the image latent (I2V), as decoded."""
        if y is None:
            return latent
        mask = first_frame_mask(*latent.shape[2:], device=latent.device)
        return blend_first_frame(latent, y.to(latent.device), mask)

    def generate(self, prompts, seed: int | None = None, image=None, negative_prompt: str | None = None,
                 callback=None, cancel=None, **overrides) -> np.ndarray | None:
        """WanPipeline.generate (uint8 [B, F, H, W, 3]); task "i2v" (the config's or an override) needs `image`,
        task "t2v" refuses one instead of ignoring it."""
        cfg = self.cfg.replace(**overrides) if overrides else self.cfg
        if cfg.task == "t2v" and image is not None:
            raise ValueError("an image was given but the task is t2v: pass task='i2v' (generate(..., task='i2v') "
                             "or --task i2v) to start the video from it, or drop the image")
        return super().generate(prompts, seed=seed, image=image, negative_prompt=negative_prompt, callback=callback,
                                cancel=cancel, **overrides)
