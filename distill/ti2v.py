"""DMD pieces for Wan2.2 TI2V-5B over batches that mix text-only and image-conditioned samples
(docs/wan22_ti2v.md, "Design: DMD for TI2V-5B").

One per-sample mask makes the two tasks one computation: all ones for a T2V sample, `first_frame_mask` for an
I2V sample (0 on latent frame 0, which holds the image's clean latent). Then

    batch = TI2VBatch.build([None, img_latent, ...], latent_shape)       # image_latent [B, C, 1, h, w], mask
    x0, _, _ = ti2v_rollout(generator_dit, cond, batch, noise, scheduler, k, step_noise)  # frame 0 = the image
    loss, m = dmd_loss(x0, TI2VNet(teacher, batch), TI2VNet(critic, batch), cond, uncond, w, shift, ...,
                       mask=batch.mask)
    critic = critic_loss(TI2VNet(critic, batch), x0, cond, shift, ..., mask=batch.mask)

`TI2VNet` is the network as the losses call it (`net(x, t [B], context, clip_fea, y)`): it puts the image latent
on frame 0 of its input and hands the DiT per-token timesteps (0 on the image's tokens), as Wan2.2's sampler does
for both CFG branches. The masks keep frame 0 of I2V samples out of the DMD gradient, its normaliser and the
critic's loss (distill/losses.py `mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from inference.guidance import Cond
from inference.sampling import NoiseFn, backward_simulation
from inference.ti2v import blend_first_frame, first_frame_mask, token_timesteps


@dataclass
class TI2VBatch:
    """Per-sample TI2V conditioning: image_latent [B, C, 1, h, w] (zeros for T2V samples: never read, their mask
    is 1) and mask [B, 1, F, h, w] (ones for T2V samples, `first_frame_mask` for I2V samples)."""

    image_latent: Tensor
    mask: Tensor

    @classmethod
    def build(cls, image_latents: Sequence[Tensor | None], latent_shape: Sequence[int],
              device: torch.device | str = "cpu") -> TI2VBatch:
        """One entry per sample: None (T2V) or that sample's image latent [C, 1, h, w] or [1, C, 1, h, w];
        latent_shape = (C, F, h, w) of the videos."""
        c, f, h, w = (int(v) for v in latent_shape)
        if not image_latents:
            raise ValueError("TI2VBatch.build needs one entry per sample (None for a text-only one)")
        latents, masks = [], []
        for i, lat in enumerate(image_latents):
            if lat is None:
                latents.append(torch.zeros(c, 1, h, w, device=device))
                masks.append(torch.ones(1, f, h, w, device=device))
                continue
            lat = lat[0] if lat.ndim == 5 and lat.shape[0] == 1 else lat
            if tuple(lat.shape) != (c, 1, h, w):
                raise ValueError(f"image latent {i} must be [{c}, 1, {h}, {w}] (one latent frame of the video's "
                                 f"latent {tuple(latent_shape)}), got {tuple(lat.shape)}")
            latents.append(lat.float().to(device))
            masks.append(first_frame_mask(f, h, w, device=device)[0])
        return cls(torch.stack(latents), torch.stack(masks))

    @property
    def text_only(self) -> bool:
        """No sample has an image: the plain T2V path (t [B]) applies to the whole batch."""
        return bool(torch.all(self.mask == 1))

    def tiled(self, batch: int) -> TI2VBatch:
        """The conditioning of a batch of `batch` rows made of whole copies of this one (CFG's [cond; uncond])."""
        n = self.mask.shape[0]
        if batch % n:
            raise ValueError(f"a batch of {batch} is not a whole number of copies of the {n} TI2V samples")
        reps = batch // n
        if reps == 1:
            return self
        return TI2VBatch(self.image_latent.repeat(reps, 1, 1, 1, 1), self.mask.repeat(reps, 1, 1, 1, 1))

    def blend(self, x: Tensor) -> Tensor:
        """x [B, C, F, h, w] with frame 0 of the I2V samples replaced by their image latents."""
        b = self.tiled(x.shape[0])
        return blend_first_frame(x, b.image_latent.to(x.device), b.mask.to(x.device))


class TI2VNet:
    """A TI2V DiT as the losses and samplers call a network: `net(x [B'], t [B'], context, clip_fea, y) -> v`
    with B' a multiple of the batch's B (CFG's [cond; uncond]); frame 0 of the input replaced by the image
    latents, per-token timesteps (0 on the image tokens). A text-only batch calls the DiT with t [B'] as is."""

    def __init__(self, net, batch: TI2VBatch) -> None:
        if getattr(net, "model_type", "ti2v") != "ti2v":
            raise ValueError(f"TI2VNet wraps a TI2V DiT (model_type 'ti2v'), got {net.model_type!r}")
        self.net, self.batch = net, batch
        self.patch_size = tuple(getattr(net, "patch_size", (1, 2, 2)))
        self._text_only = batch.text_only

    def __call__(self, x: Tensor, t: Tensor, context, clip_fea: Tensor | None = None,
                 y: Tensor | None = None) -> Tensor:
        if clip_fea is not None or y is not None:
            raise ValueError("TI2V takes neither CLIP features nor y: the image enters as its latent on frame 0")
        if self._text_only:
            return self.net(x, t, context)
        b = self.batch.tiled(x.shape[0])
        mask = b.mask.to(x.device)
        x_in = blend_first_frame(x, b.image_latent.to(x.device), mask)
        return self.net(x_in, token_timesteps(t, mask, self.patch_size, batch=x.shape[0]), context)


def ti2v_rollout(generator, cond: Cond, batch: TI2VBatch, noise: Tensor, scheduler, exit_step: int,
                 step_noise: NoiseFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The generator's DMD rollout (inference/sampling.py `backward_simulation`) for a mixed batch: returns
    (x0 [B, C, F, h, w] with frame 0 of the I2V samples = their image latents, so no gradient reaches the
    generator's frame-0 output; the exit step's input x; its timesteps t [B])."""
    x0, x, t = backward_simulation(partial(cond, TI2VNet(generator, batch)), noise, scheduler, exit_step, step_noise)
    return batch.blend(x0), x, t
