"""`ode` task: ODE-regression initialisation of the few-step generator (docs/step_distillation.md "ODE initialisation").

1. Trajectories: the teacher (CFG, Euler on a fine grid that passes *exactly* through the student's warped
   sigmas — the anchors stored states at mismatched timesteps) integrates from noise; the states at the
   student's sigmas and the clean endpoint are stored as safetensors shards `<trajectories>/shard_00000.safetensors` ...
   (`states` [n, K+1, C, F, H, W]; prompts and I2V inputs alongside). Generation is resumable: finished
   shards are skipped, each shard is written atomically.
2. Regression: pick a trajectory and a student step k, predict x0 from the stored state with the generator,
   minimise mean((x_k - s_k v - x0)^2) (distill/losses.py `ode_regression_loss`).

    accelerate launch train.py --config configs/tiny/t2v_ode.yaml
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from data.shapes import PROMPTS
from distill.data import PromptBatches, TextCache
from distill.losses import Cond, guided_x0, ode_regression_loss
from distill.prompts import load_prompts
from distill.trainer import Metrics, Trainer
from inference.config import WAN_NEGATIVE_PROMPT
from inference.flow import shift_sigma
from inference.schedulers import DistillScheduler, FlowEulerScheduler
from models.components import copy_components, load_dit, load_encoders
from models.loading import DISTILL_DIR, write_dit_folder, write_safetensors


def ode_grid(student_sigmas: list[float], steps: int, shift: float) -> tuple[list[float], list[int]]:
    """A fine decreasing grid through every student sigma and 0, uniform in unshifted time within each
    interval, with steps allotted in proportion to the interval's unshifted length (>= 2 each).
    Returns (grid, indices of the student sigmas in the grid)."""
    def unshift(s: float) -> float:  # inverse of shift_sigma
        return s / (shift - (shift - 1) * s)

    knots = [float(s) for s in student_sigmas] + [0.0]
    lengths = [unshift(a) - unshift(b) for a, b in zip(knots, knots[1:])]
    counts = [max(2, round(steps * ln / sum(lengths))) for ln in lengths]
    grid, marks = [], []
    for (a, b), n in zip(zip(knots, knots[1:]), counts):
        marks.append(len(grid))
        u = np.linspace(unshift(a), unshift(b), n + 1)[:-1]
        seg = shift_sigma(u, shift).tolist()
        seg[0] = a  # exactly the student's sigma (no round trip error)
        grid += seg
    return grid + [0.0], marks


@torch.no_grad()
def teacher_trajectory(teacher, noise: torch.Tensor, cond: Cond, uncond: Cond, guidance: float,
                       student_sigmas: list[float], steps: int, shift: float) -> torch.Tensor:
    """States of the guided teacher ODE at the student's sigmas, plus the clean endpoint: [B, K+1, ...]."""
    grid, marks = ode_grid(student_sigmas, steps, shift)
    sched = FlowEulerScheduler(shift)
    sched.set_sigmas(grid)
    x, states = noise, []
    for i in range(sched.num_steps):
        if i in marks:
            states.append(x.clone())
        s = torch.full((x.shape[0],), sched._s[i], device=x.device)
        x0 = guided_x0(teacher, x, s, cond, uncond, guidance)
        x = sched.step((x - x0) / s.view(-1, *[1] * (x.ndim - 1)), i, x)
    states.append(x)
    return torch.stack(states, dim=1)


class ODETrainer(Trainer):
    def build(self) -> None:
        cfg = self.cfg
        teacher = load_dit(cfg.model.path, dtype=torch.float32).eval().requires_grad_(False).to(self.device)
        self.task = "i2v" if teacher.model_type in ("i2v", "flf2v") else "t2v"
        self.components_path = Path(cfg.model.components_path or cfg.model.path)
        self.vae, text_encoder, image_encoder = load_encoders(self.components_path, self.task, teacher.text_len)
        self.sigmas = DistillScheduler(cfg.distill.denoising_step_list, cfg.distill.sample_shift).sigmas[:-1]
        negative = WAN_NEGATIVE_PROMPT if cfg.distill.negative_prompt is None else cfg.distill.negative_prompt
        world = cfg.data.world() \
            if cfg.data.source == "shapes" else None
        prompts = list(PROMPTS) if world is not None else load_prompts(cfg.data.prompt_path)
        self.text = TextCache(text_encoder, prompts + [negative], teacher.text_len)
        data = PromptBatches(prompts, self.text, negative, cfg.data.seed + 7919, 0, 1, self.vae, image_encoder, world)
        self.shape = self.vae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
        if self.is_main:
            self.generate_trajectories(teacher, data)
        self.accelerator.wait_for_everyone()
        self.bank = self.load_trajectories()
        gen = copy.deepcopy(teacher).train().requires_grad_(True)
        gen.gradient_checkpointing = cfg.model.gradient_checkpointing
        del teacher
        opt = torch.optim.AdamW(gen.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay)
        self.gen, self.opt = self.accelerator.prepare(gen, opt)
        self.networks, self.optimizers = {"generator": self.gen}, {"generator": self.opt}

    def generate_trajectories(self, teacher, data: PromptBatches) -> None:
        cfg, root = self.cfg.ode, Path(self.cfg.ode.trajectories)
        root.mkdir(parents=True, exist_ok=True)
        n_shards = -(-cfg.num_trajectories // cfg.shard_size)
        for shard in range(n_shards):
            path = root / f"shard_{shard:05d}.safetensors"
            if path.is_file():
                continue  # resumable: finished shards are kept
            cond, uncond, prompts = data.get(shard, 0, 1, cfg.shard_size, self.shape)
            gen = torch.Generator().manual_seed(self.cfg.seed * 7717 + shard)
            noise = torch.randn((cfg.shard_size, *self.shape), generator=gen)  # on the CPU: same on any device
            states = teacher_trajectory(teacher, noise.to(self.device), cond.to(self.device), uncond.to(self.device),
                                        cfg.guidance_scale, self.sigmas.tolist(), cfg.teacher_steps,
                                        cfg.teacher_shift).cpu()
            tensors = {"states": states}
            if cond.y is not None:
                tensors |= {"y": cond.y, "clip_fea": cond.clip_fea}
            write_safetensors(tensors, path, metadata={"prompts": json.dumps(prompts),
                                                       "sigmas": json.dumps(self.sigmas.tolist())})
            self.logger.event(0, f"trajectories: wrote {path} ({shard + 1}/{n_shards})")

    def load_trajectories(self) -> dict[str, object]:
        root = Path(self.cfg.ode.trajectories)
        shards = sorted(root.glob("shard_*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no trajectory shards in {root}")
        parts: dict[str, list] = {"states": [], "y": [], "clip_fea": [], "prompts": []}
        for path in shards:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                stored = json.loads(meta["sigmas"])
                if not np.allclose(stored, self.sigmas.tolist()):
                    raise ValueError(f"{path} holds states at sigmas {stored}, but the student uses "
                                     f"{self.sigmas.tolist()}: regenerate (delete {root}) or fix distill.*")
                for key in f.keys():
                    parts[key].append(f.get_tensor(key))
                parts["prompts"] += json.loads(meta["prompts"])
        return {k: (torch.cat(v) if v and isinstance(v[0], torch.Tensor) else v) for k, v in parts.items()}

    def train_step(self, step: int) -> Metrics:
        cfg, acc = self.cfg, self.accelerator
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step, cfg.optim.lr)
        rng = np.random.default_rng([cfg.seed, step, acc.process_index])
        n, k_max = len(self.bank["prompts"]), len(self.sigmas)
        idx = rng.integers(n, size=cfg.batch_size)
        ks = torch.from_numpy(rng.integers(k_max, size=cfg.batch_size))
        states = self.bank["states"][idx]  # [B, K+1, C, F, H, W]
        x_k = states[torch.arange(len(idx)), ks].to(self.device)
        cond = Cond(self.text([self.bank["prompts"][i] for i in idx]))
        if len(self.bank["y"]):
            cond.y, cond.clip_fea = self.bank["y"][idx], self.bank["clip_fea"][idx]
        with acc.autocast():
            loss = ode_regression_loss(self.gen, x_k, self.sigmas[ks].to(self.device), states[:, -1].to(self.device),
                                       cond.to(self.device))
        if not self.check_finite(loss.detach(), "ODE regression"):
            self.opt.zero_grad(set_to_none=True)
            return {"skipped": 1.0}
        acc.backward(loss)
        return {"loss": loss.detach(), "grad_norm": self.clip_and_step("generator"),
                "lr": self.opt.param_groups[0]["lr"]}

    def export(self) -> Path:
        out = Path(self.cfg.output_model or self.run_dir / "model")
        write_dit_folder(out, self.unwrap(self.gen), weights_name=f"{DISTILL_DIR}/distill_model.safetensors")
        copy_components(self.components_path, out)
        return out
