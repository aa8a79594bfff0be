"""`pretrain` task: flow-matching training of a (tiny) Wan teacher, T2V from scratch or I2V from a T2V one.

Loss (distill/losses.py): E || v_theta(x_s, 1000 s) - (eps - x0) ||^2 with shifted s and CFG dropout of the
text. The EMA of the weights is what gets exported as the teacher (`<run_dir>/model`, a Wan-style folder).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from distill.data import ShapesBatches, TextCache, all_prompts, shapes_world
from distill.ema import EMA
from distill.losses import flow_matching_loss
from distill.moe import range_flow_matching_loss
from distill.trainer import Metrics, Trainer
from inference.config import InferConfig
from inference.pipeline import WanPipeline
from models.components import build_dit, copy_components, load_dit, load_encoders
from models.loading import write_dit_folder
from models.registry import get_spec
from models.wan_model import WanModel


@torch.no_grad()
def init_i2v_from_t2v(i2v: WanModel, t2v_state: dict[str, torch.Tensor]) -> None:
    """Copy a T2V teacher into an I2V DiT (Wan's first-frame conditioning fine-tune).

    The patch embedding grows from z to 2z+4 input channels: the T2V filters go to the first z (the noisy
    latent, which comes first in cat([x, y])), the new mask/image channels start at zero so the network
    initially behaves like the T2V model. The image cross-attention's value projection (`v_img`) starts at zero
    too, so the image branch adds nothing until it has learnt something; the other image layers (img_emb,
    k_img, norm_k_img) keep their init and still receive gradients through v_img.
    """
    own = i2v.state_dict()
    for key in own:
        if ".cross_attn.v_img." in key:
            own[key].zero_()
    for key, value in t2v_state.items():
        if key == "patch_embedding.weight":
            own[key].zero_()
            own[key][:, : value.shape[1]] = value
        else:
            own[key].copy_(value)


class PretrainTrainer(Trainer):
    def build(self) -> None:
        cfg = self.cfg
        spec = get_spec(cfg.model.spec)
        self.task = spec.task
        torch.manual_seed(cfg.seed)  # identical init on every rank
        dit = build_dit(spec.dit)
        if cfg.model.path is not None:
            src = load_dit(cfg.model.path, dtype=torch.float32)
            if src.model_type == dit.model_type:
                dit.load_state_dict(src.state_dict())
            elif dit.model_type == "i2v" and src.model_type == "t2v":
                init_i2v_from_t2v(dit, src.state_dict())
            else:
                raise ValueError(f"cannot initialise a {dit.model_type} DiT from a {src.model_type} one")
        self.components_path = Path(cfg.model.components_path or cfg.model.path)
        self.vae, self.text_encoder, self.image_encoder = load_encoders(self.components_path, self.task,
                                                                         dit.text_len)
        dit.gradient_checkpointing = cfg.model.gradient_checkpointing
        dit.train()
        self.ema = EMA(dit, cfg.pretrain.ema_decay, cfg.pretrain.ema_start)
        opt = torch.optim.AdamW(dit.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay)
        self.dit, self.opt = self.accelerator.prepare(dit, opt)
        self.networks, self.optimizers, self.extra_state = {"model": self.dit}, {"model": self.opt}, {"ema": self.ema}
        world = shapes_world(cfg.data)
        text = TextCache(self.text_encoder, all_prompts(), dit.text_len)
        self.data = ShapesBatches(world, self.vae, text, cfg.data.cfg_dropout, cfg.data.seed,
                                  self.accelerator.process_index, self.accelerator.num_processes,
                                  self.image_encoder)

    def train_step(self, step: int) -> Metrics:
        cfg, acc = self.cfg, self.accelerator
        lr = self.lr_at(step, cfg.optim.lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(cfg.grad_accum):
            x0, cond, _ = self.data.get(step, micro, cfg.grad_accum, cfg.batch_size)
            cond = cond.to(self.device)
            # noise keyed by the chunk's index within the step (micro-batch-major, like the data): N processes
            # at batch B equal one process at batch B with grad_accum=N, sample for sample
            chunk = micro * acc.num_processes + acc.process_index
            gen = torch.Generator().manual_seed(hash((cfg.seed, step, chunk, 0)) % 2**63)
            last = micro == cfg.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
            with contextlib.nullcontext() if last else acc.no_sync(self.dit):
                with acc.autocast():
                    if cfg.pretrain.t_range is None:
                        loss = flow_matching_loss(self.dit, x0.to(self.device), cond, cfg.pretrain.timestep_shift, gen)
                    else:  # one expert of a two-expert teacher: its timesteps only (distill/moe.py)
                        loss = range_flow_matching_loss(self.dit, x0.to(self.device), cond,
                                                        cfg.pretrain.timestep_shift, cfg.pretrain.t_range, gen)
                if not self.check_finite(loss.detach(), "flow matching"):
                    self.opt.zero_grad(set_to_none=True)
                    return {"skipped": 1.0}
                acc.backward(loss / cfg.grad_accum)
            losses.append(loss.detach())
        norm = self.clip_and_step("model")
        self.ema.update(self.unwrap(self.dit), step)
        return {"loss": torch.stack(losses).mean(), "grad_norm": norm, "lr": lr}

    def ema_model(self) -> WanModel:
        model = copy.deepcopy(self.unwrap(self.dit)).eval().requires_grad_(False)
        self.ema.copy_to(model)
        return model

    def sample(self, step: int) -> None:
        cfg = self.cfg
        prompts = cfg.logging.sample_prompts
        if not prompts:
            return
        icfg = InferConfig(task=self.task, infer_steps=cfg.logging.sample_steps, sample_solver="unipc",
                           sample_guide_scale=cfg.logging.sample_guide_scale, sample_neg_prompt="",
                           target_video_length=cfg.data.num_frames, target_height=cfg.data.height,
                           target_width=cfg.data.width, seed=cfg.logging.sample_seed)
        self.write_samples(step, WanPipeline(icfg, self.ema_model(), self.vae, self.text_encoder,
                                             self.image_encoder))

    def export(self) -> Path:
        out = Path(self.cfg.output_model or self.run_dir / "model")
        write_dit_folder(out, self.ema_model())
        copy_components(self.components_path, out)
        self.logger.event(self.step, f"exported EMA teacher to {out}")
        return out
