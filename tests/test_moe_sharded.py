"""Two-expert DMD under FSDP2 (distill/moe_sharded.py): 2 gloo processes through `accelerate launch` with
configs/accelerate/fsdp.yaml against DDP with the same per-call critic sides, exact resume, the export, and the
settings that are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from distill.checkpoint import latest_checkpoint
from distill.config import load_train_config
from distill.moe import HIGH, LOW, check_dmd, check_one_dit
from models.loading import DISTILL_DIR, read_state_dict
from tests.test_distributed import SMALL, launch, metrics
from tests.test_moe_distill import moe_teacher  # noqa: F401 (the two-expert teacher fixture)

REPO = Path(__file__).resolve().parents[1]
FSDP = REPO / "configs/accelerate/fsdp.yaml"
KEYS = ["generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm", "exit_step", "critic_t"]


def base(teacher: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", "configs/train/tiny/t2v_moe_dmd.yaml", f"model.path={teacher}", f"run_dir={run}",
            f"output_model={run}/model", "max_steps=3", "dmd.dfake_gen_update_ratio=1", "dmd.ema_start=1",
            "optim.lr=1e-3", "dmd.lr_critic=1e-3", *SMALL, "checkpoint.every=2", *extra]


@pytest.mark.slow
def test_fsdp_pair_equals_ddp_resumes_and_exports(moe_teacher, tmp_path):  # noqa: F811
    """FSDP2 over both experts (2 processes) = DDP (2 processes) drawing the critic sides the same way; a run resumed
    from its step-2 checkpoint repeats step 3; the export holds both experts, equal to DDP's."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch(base(moe_teacher, ddp, "dmd.critic_side=per_call"), 2, tmp_path)
    out = launch(base(moe_teacher, fsdp), 2, tmp_path, config_file=FSDP).stdout
    assert "under fsdp" in (fsdp / "events.log").read_text(), out[-2000:]
    m_ddp, m_fsdp = metrics(ddp), metrics(fsdp)
    assert sorted(m_ddp) == sorted(m_fsdp) == [1, 2, 3]
    for step in m_ddp:
        for k in KEYS:
            assert (k in m_ddp[step]) == (k in m_fsdp[step]), (step, k)
            if k in m_ddp[step]:
                assert m_fsdp[step][k] == pytest.approx(m_ddp[step][k], rel=1e-4, abs=1e-9), (step, k)
    for name in (HIGH, LOW):
        a = read_state_dict(ddp / "model" / DISTILL_DIR / name / "distill_model.safetensors")
        b = read_state_dict(fsdp / "model" / DISTILL_DIR / name / "distill_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = latest_checkpoint(fsdp / "checkpoints").parent / "step_00000002"
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    launch(base(moe_teacher, resumed), 2, tmp_path, config_file=FSDP)
    assert sorted(metrics(resumed)) == [3]
    for k in KEYS:
        if k in metrics(fsdp)[3]:
            assert metrics(resumed)[3][k] == pytest.approx(metrics(fsdp)[3][k], rel=1e-6), k


@pytest.mark.parametrize("amsgrad", [False, True])
def test_eager_adam_state_is_the_lazy_state(amsgrad):
    """AdamW with its state made up front (distill/engine_fsdp.py) = AdamW with lazy state, over steps where one
    parameter gets no gradient at first: same weights and the same state, bit for bit."""
    from distill.engine_fsdp import eager_adam_state

    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5)]
    a, b = ([p.clone().requires_grad_(True) for p in params] for _ in range(2))
    opt_a, opt_b = (torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5, amsgrad=amsgrad) for ps in (a, b))
    eager_adam_state(opt_b)
    for step in range(3):
        grads = [torch.randn(4, 3), torch.randn(5) if step > 0 else None]  # the second: no gradient at step 0
        for ps in (a, b):
            for p, g in zip(ps, grads, strict=True):
                p.grad = None if g is None else g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refused_settings(moe_teacher, tmp_path, tiny_t2v_dir):  # noqa: F811
    def cfg(teacher, *extra):
        return load_train_config(None, ["task=dmd", f"model.path={teacher}", f"run_dir={tmp_path}/r", *extra])

    with pytest.raises(ValueError, match="critic_side=per_sample with distributed.engine=fsdp"):
        check_dmd(cfg(moe_teacher, "distributed.engine=fsdp", "dmd.critic_side=per_sample"))
    with pytest.raises(ValueError, match="trains under ddp, fsdp or hybrid, got distributed.engine=zero3"):
        check_dmd(cfg(moe_teacher, "distributed.engine=zero3"))
    with pytest.raises(ValueError, match="dmd.critic_side=per_call chooses how a two-expert teacher"):
        check_one_dit(cfg(tiny_t2v_dir, "dmd.critic_side=per_call"))
    with pytest.raises(ValueError, match="dmd.critic_side must be one of"):
        cfg(moe_teacher, "dmd.critic_side=sometimes")
    assert check_dmd(cfg(moe_teacher, "distributed.engine=fsdp")) == pytest.approx(0.875)
