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
from inference.pipeline import image_condition


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
        rng = np.random.default_rng(seeds)
        drop = rng.random(batch) < self.cfg_dropout
        text_prompts = ["" if d else p for p, d in zip(prompts, drop)]
        cond = Cond(self.text(text_prompts))
        if self.image_encoder is not None:
            cond.clip_fea, cond.y = image_condition(self.vae, self.image_encoder, video[:, :, 0],
                                                    tuple(x0.shape[1:]))
        return x0, cond, list(prompts)


def all_prompts() -> list[str]:
    """The world's 96 prompts plus "" (the unconditional prompt for CFG dropout)."""
    return list(PROMPTS) + [""]
