"""`ode` task: ODE-regression initialisation of the few-step generator (docs/step_distillation.md "ODE initialisation").

1. Trajectories: the teacher (CFG, Euler on a fine grid that passes *exactly* through the student's warped
   sigmas — the anchors stored states at mismatched timesteps) integrates from noise; the states at the
   student's sigmas and the clean endpoint are stored as safetensors shards `<trajectories>/shard_00000.safetensors` ...
   (`states` [n, K+1, C, F, H, W]; prompt rows and I2V inputs alongside). Every rank writes its share (shard s
   on rank s % processes; a shard's prompts and noise depend on s alone, so any process count writes the same
   files), each shard atomically, finished shards are skipped (resumable); rank 0 then writes `index.json`
   (shards, sigmas, a digest of the prompt list the rows refer to).
2. Regression: pick a trajectory and a student step k, predict x0 from the stored state with the generator,
   minimise mean((x_k - s_k v - x0)^2) (distill/losses.py `ode_regression_loss`). The shards are read one
   trajectory at a time with positional reads: a bank of any size costs no RAM.

    accelerate launch train.py --config configs/train/tiny/t2v_ode.yaml
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from distill.data import PromptBatches, build_prompt_batches, model_kind
from distill.encode_prompts import SafetensorsRows, negative_prompt, prompts_digest
from distill.losses import Cond, ode_regression_loss
from distill.moe import load_teacher, set_checkpointing
from distill.moe_export import write_student
from distill.trainer import Metrics, Trainer
from inference.flow import shift_sigma, timestep_of, unshift_sigma
from inference.guidance import Guidance, guided_velocity
from inference.schedule import write_schedule
from inference.schedulers import FlowEulerScheduler
from models.components import copy_components, encoder_task, load_encoders
from models.loading import DISTILL_DIR, write_dit_folder, write_safetensors
from models.moe import ExpertPair


def ode_grid(student_sigmas: list[float], steps: int, shift: float) -> tuple[list[float], list[int]]:
    """A fine decreasing grid through every student sigma and 0, uniform in unshifted time within each
    interval, with steps allotted in proportion to the interval's unshifted length (>= 2 each).
    Returns (grid, indices of the student sigmas in the grid)."""
    def unshift(s: float) -> float:
        return unshift_sigma(s, shift)

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
        t = torch.full((x.shape[0],), timestep_of(sched._s[i]), device=x.device)
        v = guided_velocity(teacher, x, t, cond, uncond, Guidance(guidance), per_sample=True)
        x = sched.step(v.float(), i, x)
    states.append(x)
    return torch.stack(states, dim=1)


TRAJECTORY_INDEX = "index.json"


def state_columns(bank_sigmas: list[float], sigmas: list[float]) -> list[int] | None:
    """Columns of a bank's states [B, K_bank + 1, ...] that hold the student's sigmas, then the clean endpoint;
    None when some student sigma is not in the bank. A bank made for the 4-step list [1000, 750, 500, 250] thus
    serves the 2-step [1000, 500] and 1-step [1000] students: each state is a point of the same teacher ODE solve
    (its grid has a knot at every bank sigma), so a sub-list reads a sub-set of the columns."""
    cols = []
    for s in sigmas:
        hits = [k for k, b in enumerate(bank_sigmas) if abs(b - s) <= 1e-6]
        if not hits:
            return None
        cols.append(hits[0])
    return cols + [len(bank_sigmas)]


class TrajectoryBank:
    """The trajectory shards of a folder, read per batch (positional reads: `SafetensorsRows`); in RAM only the
    index."""

    def __init__(self, root: str | Path, sigmas: list[float], prompts_digest: str) -> None:
        root = Path(root)
        if not (root / TRAJECTORY_INDEX).is_file():
            raise FileNotFoundError(f"no trajectory index {root / TRAJECTORY_INDEX}: generate the trajectories "
                                    f"first (task ode writes them when missing)")
        index = json.loads((root / TRAJECTORY_INDEX).read_text())
        self.columns = state_columns(index["sigmas"], sigmas)
        if self.columns is None:
            raise ValueError(f"{root} holds states at sigmas {index['sigmas']}, but the student uses {sigmas} (not a "
                             f"sub-list): regenerate (delete {root}) or fix distill.*")
        if index["prompts"] != prompts_digest:
            raise ValueError(f"{root} was generated from another prompt list (digest {index['prompts']}, now "
                             f"{prompts_digest}): its prompt rows would point at other prompts; regenerate (delete "
                             f"{root}) or restore data.prompt_path / distill.negative_prompt")
        self.files = [SafetensorsRows(root / s["file"]) for s in index["shards"]]
        self.where = [(f, i) for f, s in enumerate(index["shards"]) for i in range(s["n"])]
        self.rows = [r for s in index["shards"] for r in s["rows"]]

    def __len__(self) -> int:
        return len(self.where)

    def get(self, idx: list[int], key: str) -> torch.Tensor:
        """Tensor `key` (states [B, K+1, C, F, H, W] at the student's sigmas and the clean endpoint, y, clip_fea)
        of trajectories `idx`."""
        parts = []
        for j in idx:
            f, i = self.where[j]
            parts.append(self.files[f].rows(key, i, i + 1))
        out = torch.cat(parts)
        return out[:, self.columns] if key == "states" else out

    def has(self, key: str) -> bool:
        return key in self.files[0].keys()


class ODETrainer(Trainer):
    def build(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        # one DiT, or a two-expert (Wan2.2 A14B) pair: distill/moe.py
        teacher = load_teacher(cfg, acc).eval().requires_grad_(False).to(self.device)
        self.task = model_kind(teacher.model_type)  # a TI2V teacher was refused by distill/preflight.py
        self.components_path = Path(cfg.model.components_path or cfg.model.path)
        self.vae, text_encoder, image_encoder = load_encoders(self.components_path, encoder_task(self.task, teacher),
                                                              teacher.text_len)
        self.sigmas = cfg.distill.schedule().sigmas()[:-1]
        self.bank_sigmas = self.existing_bank_sigmas(Path(cfg.ode.trajectories))
        data = build_prompt_batches(cfg, self.task, text_encoder, self.vae, image_encoder,
                                    teacher.text_len, cfg.data.seed + 7919, self.device, acc.process_index,
                                    acc.num_processes, acc.wait_for_everyone, lambda m: self.logger.event(0, m))
        # a shard's prompts are drawn by its index alone (as one process would): any process count, same shards
        data.rank, data.world_size = 0, 1
        self.text = data.text
        self.shape = self.vae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
        digest = prompts_digest(data.prompts + [negative_prompt(cfg)])
        self.generate_trajectories(teacher, data, digest)
        self.bank = TrajectoryBank(cfg.ode.trajectories, self.sigmas.tolist(), digest)
        gen = copy.deepcopy(teacher).train().requires_grad_(True)
        set_checkpointing(gen, cfg.model.gradient_checkpointing)
        del teacher
        opt = torch.optim.AdamW(gen.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay)
        self.gen, self.opt = self.accelerator.prepare(gen, opt)
        self.networks, self.optimizers = {"generator": self.gen}, {"generator": self.opt}

    def existing_bank_sigmas(self, root: Path) -> list[float]:
        """The sigmas new shards are written at: those of the folder's first shard when it holds the student's
        sigmas (a bank made for a longer step list is reused and completed as it is), else the student's."""
        first = root / "shard_00000.safetensors"
        if first.is_file():
            with safe_open(str(first), "pt") as f:
                held = json.loads(f.metadata()["sigmas"])
            if state_columns(held, self.sigmas.tolist()) is not None:
                return held
        return self.sigmas.tolist()

    def generate_trajectories(self, teacher, data: PromptBatches, digest: str) -> None:
        """Write this rank's missing shards (shard s on rank s % processes), then (rank 0) the index."""
        cfg, root, acc = self.cfg.ode, Path(self.cfg.ode.trajectories), self.accelerator
        root.mkdir(parents=True, exist_ok=True)
        n_shards = -(-cfg.num_trajectories // cfg.shard_size)
        mine = range(acc.process_index, n_shards, acc.num_processes)
        for shard in mine:
            path = root / f"shard_{shard:05d}.safetensors"
            if path.is_file():
                self.check_shard(path, digest)
                continue  # resumable: finished shards are kept
            self.write_shard(teacher, data, shard, path, digest)
            self.logger.event(0, f"trajectories: wrote {path} (rank {acc.process_index}: {len(mine)} shards)")
        acc.wait_for_everyone()
        if self.is_main:
            shards = []
            for shard in range(n_shards):
                with safe_open(str(root / f"shard_{shard:05d}.safetensors"), "pt") as f:
                    meta = f.metadata()
                    n = f.get_slice("states").get_shape()[0]
                shards.append({"file": f"shard_{shard:05d}.safetensors", "n": n, "rows": json.loads(meta["rows"])})
            index = {"sigmas": self.bank_sigmas, "prompts": digest, "shards": shards}
            tmp = root / (TRAJECTORY_INDEX + ".tmp")
            tmp.write_text(json.dumps(index))
            tmp.replace(root / TRAJECTORY_INDEX)
        acc.wait_for_everyone()

    def check_shard(self, path: Path, digest: str) -> None:
        """A finished shard must come from the same prompt list (its rows index the list) and hold states at the
        bank's sigmas."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if meta.get("prompts_digest") != digest:
            raise ValueError(f"{path} was generated from another prompt list (digest {meta.get('prompts_digest')}, "
                             f"now {digest}): its prompt rows would point at other prompts; regenerate (delete "
                             f"{path.parent}) or restore data.prompt_path / distill.negative_prompt")
        held = json.loads(meta["sigmas"])
        if len(held) != len(self.bank_sigmas) or not np.allclose(held, self.bank_sigmas):
            raise ValueError(f"{path} holds states at sigmas {held}, but the student uses {self.sigmas.tolist()} "
                             f"(bank sigmas {self.bank_sigmas}): regenerate (delete {path.parent}) or fix distill.*")

    def write_shard(self, teacher, data: PromptBatches, shard: int, path: Path, digest: str) -> None:
        """Trajectories of one shard: prompts and noise keyed by the shard index (the same on any rank)."""
        cfg = self.cfg.ode
        rows, _ = data.draw(shard, 0, 1, cfg.shard_size)
        cond, uncond, prompts = data.get(shard, 0, 1, cfg.shard_size, self.shape)
        gen = torch.Generator().manual_seed(self.cfg.seed * 7717 + shard)
        noise = torch.randn((cfg.shard_size, *self.shape), generator=gen)  # on the CPU: same on any device
        states = teacher_trajectory(teacher, noise.to(self.device), cond.to(self.device), uncond.to(self.device),
                                    cfg.guide_scale, self.bank_sigmas, cfg.teacher_steps,
                                    cfg.teacher_sample_shift).cpu()
        tensors = {"states": states}
        if cond.y is not None:
            tensors |= {"y": cond.y, "clip_fea": cond.clip_fea}
        write_safetensors(tensors, path, metadata={"prompts": json.dumps(prompts), "rows": json.dumps(rows),
                                                   "sigmas": json.dumps(self.bank_sigmas),
                                                   "prompts_digest": digest})

    def train_step(self, step: int) -> Metrics:
        cfg, acc = self.cfg, self.accelerator
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step, cfg.optim.lr)
        rng = np.random.default_rng([cfg.seed, step, acc.process_index])
        n, k_max = len(self.bank), len(self.sigmas)
        idx = rng.integers(n, size=cfg.batch_size).tolist()
        ks = torch.from_numpy(rng.integers(k_max, size=cfg.batch_size))
        states = self.bank.get(idx, "states")  # [B, K+1, C, F, H, W]
        x_k = states[torch.arange(len(idx)), ks].to(self.device)
        cond = Cond(self.text.rows([self.bank.rows[i] for i in idx]))
        if self.bank.has("y"):
            cond.y, cond.clip_fea = self.bank.get(idx, "y"), self.bank.get(idx, "clip_fea")
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
        gen = self.unwrap(self.gen)
        if isinstance(gen, ExpertPair):  # a two-expert student: distill/moe_export.py
            return write_student(out, gen, self.components_path, self.cfg.distill.schedule(), gen.boundary)
        write_dit_folder(out, gen, weights_name=f"{DISTILL_DIR}/distill_model.safetensors")
        copy_components(self.components_path, out)
        write_schedule(out, self.cfg.distill.schedule())
        return out
