"""Training batches from the shapes world: rendered on the fly, encoded to latents, text from a cache.

Every video is a pure function of (data seed, step, micro-batch, rank, index), so the data position of a
run is its step counter: a resumed run sees exactly the batches the killed one would have seen, and two
processes never see the same video.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from data.shapes import PROMPTS, ShapesWorld
from distill.losses import Cond
from inference.pipeline import image_condition, image_to_tensor
from inference.video import read_image


class TextCache:
    """Text embeddings computed once for a fixed prompt set, zero-padded to text_len: [text_len, dim] each."""

    def __init__(self, text_encoder, prompts: Sequence[str], text_len: int) -> None:
        prompts = list(dict.fromkeys(prompts))
        embs = text_encoder.encode(prompts)
        self.table = {}
        for p, e in zip(prompts, embs):
            row = torch.zeros(text_len, e.shape[-1])
            row[: min(len(e), text_len)] = e[:text_len].float()
            self.table[p] = row

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """[B, text_len, dim] for prompts of the cached set (a KeyError names an unknown prompt)."""
        return torch.stack([self.table[p] for p in prompts])


class ShapesBatches:
    """Batches of (latent x0, conditioning) from the shapes world; I2V adds y and CLIP features."""

    def __init__(self, world: ShapesWorld, vae, text: TextCache, cfg_dropout: float, seed: int,
                 rank: int = 0, world_size: int = 1, image_encoder=None) -> None:
        self.world, self.vae, self.text = world, vae, text
        self.cfg_dropout, self.seed = cfg_dropout, seed
        self.rank, self.world_size = rank, world_size
        self.image_encoder = image_encoder

    def video_seeds(self, step: int, micro: int, accum: int, batch: int) -> list[int]:
        """Distinct seeds per (step, micro, rank, i); independent of the number of processes' interleaving."""
        base = ((step * accum + micro) * self.world_size + self.rank) * batch
        return [self.seed * 1_000_003 + base + i for i in range(batch)]

    @torch.no_grad()
    def get(self, step: int, micro: int = 0, accum: int = 1, batch: int = 8) -> tuple[Tensor, Cond, list[str]]:
        seeds = self.video_seeds(step, micro, accum, batch)
        prompts, videos = zip(*(self.world.sample(s) for s in seeds))
        video = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B,3,F,H,W]
        x0 = self.vae.encode(video).float()
        # per video (not per micro-batch): batch 2 x grad_accum 2 drops exactly the prompts batch 4 drops (the
        # key differs from the world's prompt [s, 1 << 20] and render [s, prompt index] keys)
        drop = [np.random.default_rng([int(s), 1 << 21]).random() < self.cfg_dropout for s in seeds]
        text_prompts = ["" if d else p for p, d in zip(prompts, drop)]
        cond = Cond(self.text(text_prompts))
        if self.image_encoder is not None:
            cond.clip_fea, cond.y = image_condition(self.vae, self.image_encoder, video[:, :, 0],
                                                    tuple(x0.shape[1:]))
        return x0, cond, list(prompts)


class PromptBatches:
    """Conditioning-only batches for distillation: prompts (and, for I2V, first frames of the shapes world).

    Prompt i of (step, micro, rank) is drawn from `prompts` with a generator seeded by those numbers, so the
    data position is the step counter (exact resume) and ranks see different prompts.
    """

    def __init__(self, prompts: Sequence[str], text: TextCache, negative: str, seed: int, rank: int = 0,
                 world_size: int = 1, vae=None, image_encoder=None, world: ShapesWorld | None = None,
                 image_paths: Sequence[str] | None = None) -> None:
        self.prompts, self.text, self.negative = list(prompts), text, negative
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.vae, self.image_encoder, self.world = vae, image_encoder, world
        self.image_paths = None if image_paths is None else list(image_paths)
        if image_encoder is not None and world is None and self.image_paths is None:
            raise ValueError("I2V distillation needs conditioning images: data.source=shapes, or a prompt source "
                             "with an image column (data.image_column)")

    @torch.no_grad()
    def get(self, step: int, micro: int, accum: int, batch: int,
            latent_shape: tuple[int, int, int, int]) -> tuple[Cond, Cond, list[str]]:
        """(cond, uncond, prompts) for a batch; uncond uses the negative prompt and shares I2V inputs."""
        index = ((step * accum + micro) * self.world_size + self.rank) * batch
        rng = np.random.default_rng([self.seed, index])
        seeds = [self.seed * 1_000_003 + index + i for i in range(batch)]
        if self.world is not None:  # shapes: prompts from the world's own sampler (videos only for I2V images)
            prompts = [self.world.sample_prompt(s) for s in seeds]
        else:
            rows = rng.integers(len(self.prompts), size=batch)
            prompts = [self.prompts[i] for i in rows]
        cond = Cond(self.text(prompts))
        uncond = Cond(self.text([self.negative] * batch))
        if self.image_encoder is not None:
            if self.world is not None:
                frames = [self.world.render(p, s)[0] for p, s in zip(prompts, seeds)]
            else:  # image files, resized to the training size (image_condition resizes to the latent grid)
                frames = [read_image(self.image_paths[i]) for i in rows]
            _, _, h, w = latent_shape
            size = (h * self.vae.spatial_stride, w * self.vae.spatial_stride)
            images = torch.cat([torch.nn.functional.interpolate(image_to_tensor(f)[None], size=size, mode="bicubic")
                                for f in frames]).clamp(-1, 1)
            clip_fea, y = image_condition(self.vae, self.image_encoder, images, latent_shape)
            cond.clip_fea = uncond.clip_fea = clip_fea
            cond.y = uncond.y = y
        return cond, uncond, prompts


def all_prompts() -> list[str]:
    """The world's 96 prompts plus "" (the unconditional prompt for CFG dropout)."""
    return list(PROMPTS) + [""]
