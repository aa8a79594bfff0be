"""DMD training specifics on tiny models (CPU, seconds): two time-scale updates, frozen teacher, EMA start,
no generator-loss gradient into critic or teacher, the logged exit step."""

from __future__ import annotations

import numpy as np
import torch

from tests.trainer_util import (
    by_step,
    dmd_cfg,
    metrics,
)
from train import trainer_for


# ---- DMD specifics ---------------------------------------------------------------------------------------------
def _params(net) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_dmd_two_time_scale_frozen_teacher_and_ema_start(tmp_path, one_thread, tiny_t2v_dir):
    ratio, ema_start, decay = 3, 3, 0.5
    trainer = trainer_for(dmd_cfg(tmp_path / "run", tiny_t2v_dir, "max_steps=8", f"dmd.dfake_gen_update_ratio={ratio}",
                                  f"dmd.ema_start={ema_start}", f"dmd.ema_decay={decay}", "optim.lr=1e-3",
                                  "dmd.lr_critic=1e-3"))
    real0 = {k: v.clone() for k, v in trainer.real_score.state_dict().items()}
    assert not any(p.requires_grad for p in trainer.real_score.parameters())
    teacher_ids = {id(p) for p in trainer.real_score.parameters()}
    for opt in trainer.optimizers.values():
        assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}

    ema_prev = None
    for step in range(8):
        gen0, critic0 = _params(trainer.gen), _params(trainer.critic)
        logs = trainer.train_step(step)
        is_gen = step % ratio == 0
        assert ("generator_loss" in logs) == is_gen and "critic_loss" in logs
        assert _changed(gen0, _params(trainer.gen)) == is_gen, step
        assert _changed(critic0, _params(trainer.critic)), step
        ema, gen = trainer.ema.state_dict(), _params(trainer.gen)
        if step <= ema_start:  # before the start the EMA follows the generator exactly
            assert all(torch.equal(ema[k], gen[k]) for k in gen), step
        elif is_gen:  # first averaging update: ema = decay * previous + (1 - decay) * weights
            for k in gen:
                torch.testing.assert_close(ema[k], decay * ema_prev[k] + (1 - decay) * gen[k], rtol=1e-6, atol=1e-7)
            assert _changed(ema, gen)
        ema_prev = {k: v.clone() for k, v in ema.items()}
    for k, v in trainer.real_score.state_dict().items():
        assert torch.equal(v, real0[k]), k
    assert all(p.grad is None for p in trainer.real_score.parameters())
    trainer.logger.close()


def test_dmd_generator_loss_gives_no_gradient_to_critic_or_teacher(tmp_path, one_thread, tiny_t2v_dir):
    trainer = trainer_for(dmd_cfg(tmp_path / "run", tiny_t2v_dir, "max_steps=1"))
    seen = {}
    orig = trainer.clip_and_step

    def capture(name, *a, **k):
        seen[name] = {"critic": [p.grad for p in trainer.critic.parameters()],
                      "generator": [p.grad is not None for p in trainer.gen.parameters()]}
        return orig(name, *a, **k)

    trainer.clip_and_step = capture
    trainer.generator_step(0)
    assert all(g is None for g in seen["generator"]["critic"])
    assert any(seen["generator"]["generator"])
    assert all(p.grad is None for p in trainer.real_score.parameters())
    trainer.logger.close()


def test_dmd_logged_generator_steps_and_exit_step(tmp_path, one_thread, tiny_t2v_dir, monkeypatch):
    from accelerate import Accelerator

    run = tmp_path / "run"
    trainer = trainer_for(dmd_cfg(run, tiny_t2v_dir, "max_steps=5", "dmd.dfake_gen_update_ratio=2"))
    trainer.train()
    rows = by_step(metrics(run))
    assert [s for s, r in rows.items() if "generator_loss" in r] == [1, 3, 5]  # iterations 0, 2, 4
    assert all("critic_loss" in r for r in rows.values())
    for s in (1, 3, 5):
        assert rows[s]["exit_step"] == trainer.exit_step(s - 1, 0)
    # the exit step depends on (seed, step) only: the same on every rank, uniform over the student's steps
    ref = [trainer.exit_step(s, p) for s in range(400) for p in (0, 1)]
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: 1))
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    assert [trainer.exit_step(s, p) for s in range(400) for p in (0, 1)] == ref
    counts = np.bincount(ref, minlength=4)
    assert len(counts) == 4 and counts.min() > 150, counts
    trainer.cfg.seed = 1
    assert [trainer.exit_step(s, 0) for s in range(50)] != ref[0:100:2]
