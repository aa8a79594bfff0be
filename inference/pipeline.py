"""The T2V / I2V generation pipeline shared by `infer.py`, the server, the web UI and the trainer's samples.

One call of `generate` runs: text encoding (cached per prompt; the negative prompt only when CFG is on) ->
I2V conditioning (CLIP features and y = [mask, VAE latent of (image, zeros)], as in Wan) -> the sampler over
the scheduler's steps with CFG as one batched forward -> VAE decode -> uint8 frames [B, F, H, W, 3].

Wan2.2 A14B (`dit` an `ExpertPair`, docs/wan22.md): each step runs the expert its timestep (or, for a student
with boundary_step_index, its position) selects, with that expert's guidance scale (inference/moe.py); the
I2V experts take y but no CLIP features, so such a model needs no image encoder.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from inference.config import InferConfig, check_video_size
from inference.guidance import Cond, Guidance, guided_velocity
from inference.moe import ExpertSwitch, expert_plan, step_scales
from inference.offload import ComponentOffload, offloader
from inference.sampling import gaussian_noise, sample
from inference.schedulers import DistillScheduler, FlowEulerScheduler, FlowUniPCScheduler
from inference.video import read_image
from models.moe import ExpertPair


def make_scheduler(cfg: InferConfig):
    """The scheduler the config asks for: the few-step distill one when `denoising_step_list` is set."""
    if cfg.is_distill:
        return DistillScheduler.from_schedule(cfg.schedule())
    if cfg.sample_solver == "euler":
        return FlowEulerScheduler(shift=cfg.sample_shift)
    return FlowUniPCScheduler(shift=cfg.sample_shift)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device) -> Tensor:
    """Noise [B, *shape] where sample i depends only on seeds[i] (reproducible whatever the batch)."""
    out = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


def to_uint8(video: Tensor) -> np.ndarray:
    """[B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def image_to_tensor(image: np.ndarray | Tensor) -> Tensor:
    """uint8 [H, W, 3] (or float [3, H, W] in [-1, 1]) -> float [3, H, W] in [-1, 1]."""
    if isinstance(image, Tensor) and image.is_floating_point():
        return image.float()
    arr = torch.as_tensor(np.asarray(image))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8 RGB, got shape {tuple(arr.shape)}")
    return arr.permute(2, 0, 1).float() / 127.5 - 1


def image_condition(vae, image_encoder, images: Tensor, shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Wan's I2V conditioning for images [B, 3, H, W] in [-1, 1] and a latent shape (z, f, h, w).

    Returns CLIP features [B, N, clip_dim] (None when `image_encoder` is None: the Wan2.2 I2V experts take
    none) and y [B, 4 + z, f, h, w] = concat(mask, VAE latent of [image, zeros...]) where the mask is 1 on
    latent frame 0 (the given image) and 0 on the frames to generate.
    """
    z, f, h, w = shape
    s = vae.spatial_stride
    frames = (f - 1) * vae.temporal_stride + 1
    img = F.interpolate(images.float(), size=(h * s, w * s), mode="bicubic", align_corners=False).clamp(-1, 1)
    clip_fea = image_encoder.encode(images) if image_encoder is not None else None
    video = torch.zeros(img.shape[0], 3, frames, h * s, w * s, device=img.device)
    video[:, :, 0] = img
    latent = vae.encode(video).float()
    mask = torch.zeros(img.shape[0], 4, f, h, w, device=latent.device)
    mask[:, :, 0] = 1.0
    return clip_fea, torch.cat([mask, latent], dim=1)


@dataclass
class Timings:
    """Wall time per stage (seconds) and the number of DiT evaluations of the last call."""

    stages: dict[str, float] = field(default_factory=dict)
    nfe: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class WanPipeline:
    """Holds the networks once; `generate` may be called many times with per-call overrides."""

    parallel = None  # a torchrun group's ParallelState (inference/parallel.py `attach`); None: one process

    def __init__(self, cfg: InferConfig, dit, vae, text_encoder, image_encoder=None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 offload: ComponentOffload | None = None, experts_offloaded: bool = False) -> None:
        self.cfg, self.dit, self.vae = cfg, dit, vae
        self.offload = offload  # components that visit the device only for their stage (inference/offload.py)
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.timings = Timings()
        # Wan2.2 MoE: calls the planned expert of each step; `experts_offloaded` (cpu_offload): only the active
        # expert on the device, the other released when the boundary is crossed.
        self.switch = None
        if isinstance(dit, ExpertPair):
            self.switch = ExpertSwitch((dit.high_noise_model, dit.low_noise_model), experts_offloaded)
        net = dit.high_noise_model if isinstance(dit, ExpertPair) else dit
        if cfg.task == "i2v" and image_encoder is None and hasattr(net, "img_emb"):
            raise ValueError("task i2v needs an image encoder (CLIP) in the model folder")

    def _stage(self, *names: str) -> contextlib.AbstractContextManager:
        """Offloaded components among `names` are on the device inside this context (see ComponentOffload)."""
        return self.offload.stage(*names) if self.offload is not None else contextlib.nullcontext()

    # ---- conditioning -------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> context [B, L, text_dim] zero-padded to the DiT's text_len (rows beyond a prompt are 0)."""
        embs = self.text_encoder.encode(list(prompts))
        text_len = self.dit.text_len
        ctx = torch.zeros(len(embs), text_len, embs[0].shape[-1])
        for i, e in enumerate(embs):
            ctx[i, : min(len(e), text_len)] = e[:text_len]
        return ctx.to(self.device, self.dtype)

    def latent_size(self, cfg: InferConfig, image: Tensor | None) -> tuple[int, int, int, int]:
        """(z, f, h, w) of the latent. I2V follows the image's aspect ratio at the target area, as Wan does."""
        if image is None:
            return self.vae.latent_shape(cfg.target_video_length, cfg.target_height, cfg.target_width)
        s, patch = self.vae.spatial_stride, 2
        h, w = image.shape[-2:]
        area = cfg.target_height * cfg.target_width
        lat_h = round(np.sqrt(area * h / w) // s // patch * patch)
        lat_w = round(np.sqrt(area * w / h) // s // patch * patch)
        return self.vae.latent_shape(cfg.target_video_length, lat_h * s, lat_w * s)

    def encode_image(self, images: Tensor, shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
        clip_fea, y = image_condition(self.vae, self.image_encoder, images.to(self.device), shape)
        return (None if clip_fea is None else clip_fea.to(self.dtype)), y.to(self.dtype)

    # ---- sampling -----------------------------------------------------------------------------------------
    def make_denoiser(self, cond: Tensor, uncond: Tensor | None, guidance: Guidance | Sequence[Guidance],
                      clip_fea: Tensor | None, y: Tensor | None, guided: Sequence[bool] | None = None,
                      plan: Sequence[int] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """v(x, t) for the sampler: `guided_velocity` (inference/guidance.py), one batched [cond; uncond] forward.

        `guided`: one flag per sampler step (`Guidance.applies_at` of the step's timestep, decided on the host
        from the schedule: no device sync); the returned function must then be called once per step, in order,
        as `sample` does. Unguided steps run the conditional branch alone. Wan2.2 MoE: `plan` holds the expert of
        each step (inference/moe.py `expert_plan`) and `guidance` one Guidance per step (that expert's scale)."""
        if self.parallel is not None and self.parallel.cfg.cfg_p_size > 1:  # the two branches on two ranks
            return self.parallel.cfg_denoiser(self, cond, uncond, guidance.scale, clip_fea, y, guided)
        c = Cond(cond, clip_fea, y)
        u = None if uncond is None else Cond(uncond, clip_fea, y)
        if plan is not None and self.switch is None:
            raise ValueError("an expert plan needs a two-expert (Wan2.2 MoE) DiT")
        step = itertools.count()  # the sampler calls once per step, in order

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            i = next(step) if guided is not None or plan is not None else 0
            g = guidance if isinstance(guidance, Guidance) else guidance[i]
            apply = u is not None and g.enabled and (guided is None or guided[i])
            net = self.switch.select(plan[i]) if plan is not None else self.dit
            self.timings.nfe += x.shape[0] * (2 if apply else 1)
            return guided_velocity(net, x.to(self.dtype), t, c, u, g, per_sample=False, apply=apply)

        return denoise

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], seed: int | None = None, image=None,
                 negative_prompt: str | None = None, callback: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool] | None = None, **overrides) -> np.ndarray | None:
        """Generate one video per prompt; video i uses seed + i. Returns uint8 [B, F, H, W, 3] (None on the
        ranks other than 0 of a torchrun group, which compute but do not decode).

        `overrides` are InferConfig fields for this call only (infer_steps, sample_shift, sample_guide_scale,
        enable_cfg, target_video_length, target_height, target_width, denoising_step_list, ...).
        `image` (I2V) is one uint8 [H, W, 3] array or image file path (shared), or a list of them (one per prompt).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        cfg = self.cfg.replace(**overrides) if overrides else self.cfg
        check_video_size(cfg.target_video_length, cfg.target_height, cfg.target_width)
        seed = cfg.seed if seed is None else seed
        images = self._images(cfg, image, len(prompts))
        self.timings = Timings()

        t0 = time.perf_counter()
        use_cfg = cfg.cfg_active
        with self._stage("text_encoder"):
            cond = self.encode_text(prompts)
            neg = negative_prompt if negative_prompt is not None else cfg.sample_neg_prompt
            uncond = self.encode_text([neg] * len(prompts)) if use_cfg else None
        self.timings.add("text_encoder", time.perf_counter() - t0)

        t0 = time.perf_counter()
        shape = self.latent_size(cfg, images)
        clip_fea = y = None
        if images is not None:
            with self._stage("image_encoder", "vae"):
                clip_fea, y = self.encode_image(images, shape)
        self.timings.add("image_encoder", time.perf_counter() - t0)

        t0 = time.perf_counter()
        scheduler = make_scheduler(cfg)
        scheduler.set_timesteps(None if cfg.is_distill else cfg.infer_steps)
        # One generator per video (seed + i): the initial noise (as seeded_noise) and then, for the lcm update,
        # the fresh noise of every step, so that video i does not depend on the batch it was generated in.
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(self.device)
        guidance, plan = self._guidance(cfg, scheduler.timesteps.cpu(), use_cfg)
        ts = scheduler.timesteps.cpu().tolist()  # the schedule is on the host
        guided = [(guidance if isinstance(guidance, Guidance) else guidance[i]).applies_at(t)
                  for i, t in enumerate(ts)]
        denoise = self.make_denoiser(cond, uncond, guidance, clip_fea, y, guided, plan)
        if self.parallel is not None:  # all ranks poll rank 0's cancel flag, so they stop at the same step
            cancel = self.parallel.sync_cancel(cancel)
        step_noise = gaussian_noise(gens) if scheduler.needs_noise else None  # video i's noise: its own generator
        latent = sample(denoise, noise, scheduler, step_noise, callback=callback, cancel=cancel)
        if self.switch is not None:
            self.switch.release()  # offloaded experts: the VAE stage gets their device memory
        elif (dit_offload := offloader(self.dit)) is not None:
            dit_offload.release()  # the VAE stage gets the memory of the blocks in flight
        self.timings.add("dit", time.perf_counter() - t0)
        if self.parallel is not None and not self.parallel.is_main:
            return None  # on a torchrun group rank 0 alone decodes (docs/parallel_inference.md)

        t0 = time.perf_counter()
        latent = self.final_latent(latent, y)
        with self._stage("vae"):
            video = self.vae.decode(latent.float())
        out = to_uint8(video)
        self.timings.add("vae_decode", time.perf_counter() - t0)
        return out

    def final_latent(self, latent: Tensor, y: Tensor | None) -> Tensor:
        """The sampled latent as the VAE decodes it; TI2V puts the image latent back on frame 0
        (inference/ti2v_pipeline.py)."""
        return latent

    def _guidance(self, cfg: InferConfig, timesteps: Tensor, use_cfg: bool
                  ) -> tuple[Guidance | list[Guidance], list[int] | None]:
        """One Guidance (a single DiT) or, for the MoE, the expert plan and one Guidance per step (its expert's
        scale: sample_guide_scale [high, low])."""
        if self.switch is None:
            scale = cfg.guide_scales()[0]
            return (Guidance(scale, cfg.sample_guide_interval) if use_cfg else Guidance()), None
        boundary = cfg.boundary if cfg.boundary is not None else self.dit.boundary
        plan = expert_plan(timesteps, boundary, cfg.boundary_step_index)
        scales = step_scales(plan, cfg.guide_scales()) if use_cfg else [1.0] * len(plan)
        return [Guidance(w, cfg.sample_guide_interval) for w in scales], plan

    def _images(self, cfg: InferConfig, image, n: int) -> Tensor | None:
        if cfg.task != "i2v":
            return None
        if image is None:
            raise ValueError("task i2v needs an image (--image_path / image=)")
        imgs = list(image) if isinstance(image, list | tuple) else [image] * n
        if len(imgs) != n:
            raise ValueError(f"got {len(imgs)} images for {n} prompts")
        # An image file path (str / Path) is read here, with read_image's clear errors (issue 15).
        imgs = [read_image(im) if isinstance(im, str | os.PathLike) else im for im in imgs]
        return torch.stack([image_to_tensor(im) for im in imgs])
