"""`dmd` task: Distribution Matching Distillation of a many-step CFG teacher into a few-step CFG-free student.

Three networks (docs/step_distillation.md): the generator G (trainable, starts from the teacher or an ODE-init
checkpoint), the frozen teacher `real_score` (no grads, no optimizer state) and the critic `fake_score`
(trainable, starts from the teacher). Each iteration trains the critic on G's samples; every
`dfake_gen_update_ratio` iterations G takes a DMD step first. Both use the one-graded-exit-step backward
simulation of inference/sampling.py over the student's warped `denoising_step_list`, so training and inference
see the same timesteps.

    accelerate launch train.py --config configs/train/tiny/t2v_dmd.yaml
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch

from distill.adapters import lightx2v_lora, merged, with_lora
from distill.data import PromptBatches, build_prompt_batches, model_kind
from distill.ema import EMA
from distill.losses import Cond, critic_loss, dmd_loss
from distill.moe import build_dmd as build_moe_dmd
from distill.moe import check_one_dit, is_expert_folder, pair_student
from distill.moe_export import export_pair
from distill.moe_sharded import call_side
from distill.ti2v import TI2VBatch, TI2VNet, ti2v_rollout
from distill.trainer import Metrics, Trainer
from inference.config import InferConfig
from inference.sampling import backward_simulation, gaussian_noise
from inference.schedule import write_schedule
from inference.schedulers import DistillScheduler
from models.components import build_dit, copy_components, load_dit, load_encoders
from models.loading import (
    DISTILL_DIR,
    DIT_CONFIG,
    find_dit_weights,
    load_into,
    read_json,
    read_sharded,
    read_state_dict,
    write_dit_folder,
    write_safetensors,
)
from models.moe import ExpertPair


def seeded(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (same on every rank for the same key)."""
    return torch.Generator().manual_seed(hash(tuple(int(k) for k in key)) % 2**63)


class DMDTrainer(Trainer):
    def build(self) -> None:
        if is_expert_folder(self.cfg.model.path):  # a two-expert (Wan2.2 A14B) teacher: distill/moe.py
            return build_moe_dmd(self)
        check_one_dit(self.cfg)
        if self.engine:
            return self._build_sharded()
        cfg = self.cfg
        teacher = Path(cfg.model.path)
        real = load_dit(teacher, dtype=torch.float32)
        self.task = model_kind(real.model_type)
        self.components_path = Path(cfg.model.components_path or teacher)
        self.vae, self.text_encoder, self.image_encoder = load_encoders(self.components_path, self.task,
                                                                         real.text_len)
        dtype = torch.bfloat16 if cfg.dmd.real_score_dtype == "bf16" else torch.float32
        if cfg.lora.enabled:  # one frozen base shared by all three networks; adapters train (fp32)
            self.real_score = real.to(self.device, dtype).eval().requires_grad_(False)
            gen, critic = (with_lora(self.real_score, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
                           for _ in range(2))
        else:
            init = cfg.model.generator_init
            gen = load_dit(init, distill=True, dtype=torch.float32) if init else copy.deepcopy(real)
            critic = copy.deepcopy(real)
            self.real_score = real.to(self.device, dtype).eval().requires_grad_(False)
            gen.requires_grad_(True)
            critic.requires_grad_(True)
        for net in (gen, critic):
            net.train()
            net.gradient_checkpointing = cfg.model.gradient_checkpointing
        self.ema = EMA(gen, cfg.dmd.ema_decay, cfg.dmd.ema_start)
        opt_g, opt_c = self._optimizer("generator")(gen.parameters()), self._optimizer("critic")(critic.parameters())
        self.gen, self.critic, self.opt_g, self.opt_c = self.accelerator.prepare(gen, critic, opt_g, opt_c)
        self.trainable_only = cfg.lora.enabled  # checkpoints hold the adapters, not the shared base
        self._finish_build(real.text_len)

    def _optimizer(self, name: str):
        """AdamW factory for `name` (generator: optim.lr, critic: dmd.lr_critic) over the trainable params."""
        cfg = self.cfg
        lr = cfg.optim.lr if name == "generator" else cfg.dmd.lr_critic
        return lambda params: torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr,
                                                betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)

    def _build_sharded(self) -> None:
        """The three networks under a sharded engine: rank 0 reads each network's weights, the other ranks build
        meta skeletons, the engine shards them (distill/engines.py); the EMA tracks this rank's shards."""
        cfg, engine = self.cfg, self.engine
        teacher = Path(cfg.model.path)

        def weights(folder: Path, distill: bool = False):
            skeleton = build_dit(read_json(Path(folder) / DIT_CONFIG), "meta")
            if not engine.is_loader:
                return skeleton, None
            src = find_dit_weights(Path(folder), distill, None)
            state = read_sharded(Path(folder), dtype=torch.float32) if src.kind == "base" else \
                read_state_dict(src.path, torch.float32)
            return skeleton, state

        real_dtype = torch.bfloat16 if cfg.dmd.real_score_dtype == "bf16" else torch.float32
        skeleton, state = weights(teacher)
        text_len, model_type = skeleton.text_len, skeleton.model_type
        self.real_score = engine.frozen(skeleton, state, real_dtype)
        init = cfg.model.generator_init
        for name in ("generator", "critic"):
            skeleton, state = weights(Path(init), distill=True) if name == "generator" and init else weights(teacher)
            skeleton.gradient_checkpointing = cfg.model.gradient_checkpointing
            net, opt = engine.trainable(name, skeleton.train(), state, self._optimizer(name),
                                        cfg.optim.grad_clip if name == "generator" else cfg.dmd.grad_clip_critic)
            self.networks[name], self.optimizers[name] = net, opt
        self.gen, self.critic = self.networks["generator"], self.networks["critic"]
        self.opt_g, self.opt_c = self.optimizers["generator"], self.optimizers["critic"]
        self.task = model_kind(model_type)
        self.components_path = Path(cfg.model.components_path or teacher)
        self.vae, self.text_encoder, self.image_encoder = load_encoders(self.components_path, self.task, text_len)
        self.ema = EMA(self.unwrap(self.gen), cfg.dmd.ema_decay, cfg.dmd.ema_start, local=engine.ema_local)
        self._finish_build(text_len)

    def _finish_build(self, text_len: int) -> None:
        cfg = self.cfg
        # the teacher's CFG in the DMD loss: a scale, or one scale per expert (two-expert teachers, distill/moe.py)
        self.real_guidance = getattr(self, "real_guidance", cfg.dmd.guide_scale)
        self.networks = {"generator": self.gen, "critic": self.critic}
        self.optimizers = {"generator": self.opt_g, "critic": self.opt_c}
        self.extra_state = {"ema": self.ema}
        # the backward simulation re-noises with fresh noise (the schedule's trained_with, "lcm")
        self.scheduler = DistillScheduler.from_schedule(cfg.distill.schedule(), mode="lcm")
        self.latent_shape = self.vae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
        self.data = self._build_data(text_len)

    def _build_data(self, text_len: int) -> PromptBatches:
        """Prompts (I2V: images) and text rows (prompt store or in-memory cache): distill/data.py."""
        acc = self.accelerator
        return build_prompt_batches(self.cfg, self.task, self.text_encoder, self.vae, self.image_encoder,
                                    text_len, self.cfg.data.seed, self.device, acc.process_index,
                                    acc.num_processes, acc.wait_for_everyone, lambda m: self.logger.event(0, m))

    # ---- one iteration ----------------------------------------------------------------------------------------
    def _batch(self, step: int, micro: int, phase: int
               ) -> tuple[Cond, Cond, torch.Tensor, torch.Generator, TI2VBatch | None]:
        """(cond, uncond, noise, rng, TI2V conditioning or None) of a micro-batch."""
        cfg, acc = self.cfg, self.accelerator
        args = (2 * step + phase, micro, cfg.grad_accum, cfg.batch_size, self.latent_shape)
        if self.task == "ti2v":
            cond, uncond, _, ti2v = self.data.get_ti2v(*args)
        else:
            (cond, uncond, _), ti2v = self.data.get(*args), None
        # keyed by the chunk's index within the step (micro-batch-major, like the data): N processes at batch B
        # equal one process at batch B with grad_accum=N (a 5-tuple: never the 4-tuple key of exit_step)
        rng = seeded(cfg.seed, step, phase, micro * acc.num_processes + acc.process_index, 0)
        noise = torch.randn((cfg.batch_size, *self.latent_shape), generator=rng).to(self.device)
        return cond.to(self.device), uncond.to(self.device), noise, rng, ti2v

    def rollout(self, cond: Cond, ti2v: TI2VBatch | None, noise: torch.Tensor, k: int,
                rng: torch.Generator) -> torch.Tensor:
        """The generator's backward simulation to exit step k -> x0 [B, C, F, h, w]; TI2V: through `TI2VNet`,
        frame 0 of the image samples replaced by their image latents (distill/ti2v.py)."""
        if ti2v is None:
            return backward_simulation(partial(cond, self.gen), noise, self.scheduler, k, gaussian_noise(rng))[0]
        return ti2v_rollout(self.gen, cond, ti2v, noise, self.scheduler, k, gaussian_noise(rng))[0]

    @staticmethod
    def scored(net, ti2v: TI2VBatch | None):
        """A score network as the losses call it: itself, or TI2V: wrapped to see the batch's image latents."""
        return net if ti2v is None else TI2VNet(net, ti2v)

    def exit_step(self, step: int, phase: int) -> int:
        """The graded exit step, drawn from (seed, step) only: identical on every rank without communication."""
        return int(torch.randint(self.scheduler.num_steps, (1,), generator=seeded(self.cfg.seed, step, phase, 7)))

    def generator_step(self, step: int) -> Metrics:
        cfg, acc = self.cfg, self.accelerator
        k = self.exit_step(step, 0)
        logs: Metrics = {"exit_step": float(k)}
        for micro in range(cfg.grad_accum):
            cond, uncond, noise, rng, ti2v = self._batch(step, micro, 0)
            last = micro == cfg.grad_accum - 1
            with self.no_sync("generator", last):
                with acc.autocast():
                    x = self.rollout(cond, ti2v, noise, k, rng)
                    mask = None if ti2v is None else ti2v.mask
                    loss, m = dmd_loss(x, self.scored(self.real_score, ti2v), self.scored(self.critic, ti2v), cond,
                                       uncond, self.real_guidance, cfg.dmd.timestep_shift, cfg.dmd.t_min,
                                       cfg.dmd.t_max, rng, cfg.dmd.guide_interval, mask=mask,
                                       side=call_side(self, step, 0, micro))
                if not self.check_finite(loss.detach(), "generator DMD"):
                    self.opt_g.zero_grad(set_to_none=True)
                    return {"generator_skipped": 1.0}
                self.backward("generator", loss, last)
            logs.update(m)
            logs["generator_loss"] = logs.get("generator_loss", 0.0) + loss.detach() / cfg.grad_accum
        logs["generator_grad_norm"] = self.clip_and_step("generator", cfg.optim.grad_clip)
        self.ema.update(self.unwrap(self.gen), step)
        return logs

    def critic_step(self, step: int) -> Metrics:
        cfg, acc = self.cfg, self.accelerator
        k = self.exit_step(step, 1)
        total = 0.0
        for micro in range(cfg.grad_accum):
            cond, _, noise, rng, ti2v = self._batch(step, micro, 1)
            with torch.no_grad(), acc.autocast():
                x = self.rollout(cond, ti2v, noise, k, rng)
            last = micro == cfg.grad_accum - 1
            with self.no_sync("critic", last):
                with acc.autocast():
                    loss = critic_loss(self.scored(self.critic, ti2v), x, cond, cfg.dmd.timestep_shift, cfg.dmd.t_min,
                                       cfg.dmd.t_max, rng, mask=None if ti2v is None else ti2v.mask,
                                       side=call_side(self, step, 1, micro))
                if not self.check_finite(loss.detach(), "critic"):
                    self.opt_c.zero_grad(set_to_none=True)
                    return {"critic_skipped": 1.0}
                self.backward("critic", loss, last)
            total = total + loss.detach() / cfg.grad_accum
        return {"critic_loss": total, "critic_grad_norm": self.clip_and_step("critic", cfg.dmd.grad_clip_critic)}

    def train_step(self, step: int) -> Metrics:
        for group in self.opt_g.param_groups:
            group["lr"] = self.lr_at(step, self.cfg.optim.lr)
        logs: Metrics = {}
        if step % self.cfg.dmd.dfake_gen_update_ratio == 0:
            logs.update(self.generator_step(step))
        logs.update(self.critic_step(step))
        logs["lr_generator"] = self.opt_g.param_groups[0]["lr"]
        logs["lr_critic"] = self.opt_c.param_groups[0]["lr"]
        return logs

    # ---- outputs ----------------------------------------------------------------------------------------------
    def student(self, ema: bool = True, sampling: bool = False):
        """The generator as a plain DiT (EMA weights if `ema`); LoRA mode: adapters merged into the base.
        `sampling`: on the training device in the training dtype (the export stays fp32).

        Sharded engines: a collective (every rank gathers); rank 0 gets the DiT, the other ranks None."""
        gen = self.unwrap(self.gen)
        if isinstance(gen, ExpertPair):  # a two-expert student (distill/moe.py)
            return pair_student(self, ema, sampling)
        device, dtype = (self.device, self.train_dtype) if sampling else (None, torch.float32)
        if self.engine:
            state = self.engine.full_state_dict(self.gen)
            if ema:
                state.update(self.engine.full_ema(self.ema, self.gen))
            if not self.is_main:
                return None
            # one tensor at a time to the device/dtype, so no full fp32 copy of the model is built on the host
            state = {k: (v := state.pop(k)).to(device, dtype if v.is_floating_point() else None) for k in list(state)}
            return load_into(build_dit(gen.config, "meta"), state, "gathered generator").eval().requires_grad_(False)
        if self.cfg.lora.enabled:
            return merged(gen, self.ema.state_dict() if ema else None).to(device, dtype).eval().requires_grad_(False)
        # built tensor by tensor in the target dtype (no full fp32 copy of the generator on the device first)
        state = {**gen.state_dict(), **(self.ema.state_dict() if ema else {})}
        state = {k: v.detach().to(device, dtype if v.is_floating_point() else None, copy=True)
                 for k, v in state.items()}
        return load_into(build_dit(gen.config, "meta"), state, "generator").eval().requires_grad_(False)

    def infer_config(self) -> InferConfig:
        cfg = self.cfg
        sch = cfg.distill.schedule()
        # a TI2V student samples text-to-video through model_cls wan2.2 (TI2VPipeline; docs/wan22_ti2v.md)
        task, model_cls = ("t2v", "wan2.2") if self.task == "ti2v" else (self.task, "wan2.1_distill")
        return InferConfig(task=task, model_cls=model_cls,
                           denoising_step_list=list(sch.denoising_step_list), sample_shift=sch.shift,
                           distill_update=sch.update, enable_cfg=False,
                           target_video_length=cfg.data.num_frames, target_height=cfg.data.height,
                           target_width=cfg.data.width, seed=cfg.logging.sample_seed)

    def sample(self, step: int) -> None:
        prompts = self.cfg.logging.sample_prompts
        if not prompts:
            return
        student = self.student(ema=step > self.cfg.dmd.ema_start, sampling=True)
        if student is not None:  # rank 0 (sharded engines gather on every rank)
            self.write_samples(step, self.sample_pipeline(self.infer_config(), student))

    def export(self) -> Path:
        """A Wan-style folder: teacher config + components + distill_models/distill_model.safetensors; LoRA mode
        adds the generator's adapter as a LightX2V LoRA, `lora/distill_lora_r<rank>.safetensors` (no SVD)."""
        if isinstance(self.unwrap(self.gen), ExpertPair):
            return export_pair(self)
        out = Path(self.cfg.output_model or self.run_dir / "model")
        use_ema = self.step > self.cfg.dmd.ema_start
        student = self.student(ema=use_ema)
        if student is None:  # a sharded engine's rank > 0: its shards went into the gather
            return out
        write_dit_folder(out, student, weights_name=f"{DISTILL_DIR}/distill_model.safetensors")
        copy_components(self.components_path, out)
        write_schedule(out, self.cfg.distill.schedule())
        if self.cfg.lora.enabled:
            lora = lightx2v_lora(self.unwrap(self.gen), self.ema.state_dict() if use_ema else None)
            path = write_safetensors(lora, out / "lora" / f"distill_lora_r{self.cfg.lora.rank}.safetensors",
                                     metadata={"rank": str(self.cfg.lora.rank), "format": "lightx2v"})
            self.logger.event(self.step, f"exported the generator's adapter to {path}")
        self.logger.event(self.step, f"exported student to {out}")
        return out


__all__ = ["DMDTrainer", "write_safetensors"]
