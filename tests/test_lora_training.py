"""LoRA-mode DMD (distill/adapters.py): one shared frozen base, adapters only in optimizers/EMA/checkpoints,
exact resume, export as a LightX2V LoRA (no SVD) that inference merges into the teacher = the exported student."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.adapters import LoRALinear, lightx2v_lora, merged, target_names, with_lora
from distill.checkpoint import list_checkpoints
from distill.config import LORA_TARGETS
from models.components import load_dit
from tests.test_trainer import REPO, assert_same_metrics, by_step, dmd_cfg, metrics, train
from train import trainer_for

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]


def _random_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_up.weight.copy_(0.05 * torch.randn(m.lora_up.weight.shape, generator=g))


def _forward(model, x, t, ctx):
    with torch.no_grad():
        return model(x, t, ctx)


@pytest.fixture(scope="module")
def base(tiny_t2v_dir):
    return load_dit(tiny_t2v_dir).requires_grad_(False)


@pytest.fixture(scope="module")
def inputs(base):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, base.in_dim, 2, 8, 8, generator=g)
    return x, torch.tensor([900.0, 300.0]), torch.randn(2, base.text_len, base.text_dim, generator=g)


def test_adapters_share_the_base_and_start_as_identity(base, inputs):
    gen = with_lora(base, rank=4, alpha=8)
    names = target_names(base, ["blocks\\.\\d+\\.ffn\\.(0|2)", "blocks\\.0\\.self_attn\\.q"])
    assert names == ["blocks.0.self_attn.q", "blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]
    # every base tensor is the teacher's own storage: no copy
    shared = dict(base.named_parameters())
    for k, p in gen.named_parameters():
        if "lora_" not in k:
            key = k.replace(".base.", ".")
            assert p.data_ptr() == shared[key].data_ptr() and not p.requires_grad, k
    trainable = [k for k, p in gen.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_up." in k or ".lora_down." in k for k in trainable)
    assert len(trainable) == 2 * len(target_names(base, LORA_TARGETS))
    torch.testing.assert_close(_forward(gen, *inputs), _forward(base, *inputs), rtol=0, atol=0)  # B = 0
    with pytest.raises(ValueError, match="match no nn.Linear"):
        with_lora(base, 4, 4, ["blocks\\.\\d+\\.attn\\.q"])


def test_lora_linear_formula_and_merge(base, inputs):
    gen = with_lora(base, rank=4, alpha=8)
    _random_adapters(gen)
    m = gen.blocks[0].self_attn.q
    x = torch.randn(3, m.base.in_features)
    want = x @ m.base.weight.T + m.base.bias + (8 / 4) * (x @ m.lora_down.weight.T) @ m.lora_up.weight.T
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    plain = merged(gen)
    assert not any(isinstance(mod, LoRALinear) for mod in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_forward(plain, *inputs), _forward(gen, *inputs), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_forward(plain, *inputs), _forward(base, *inputs), atol=1e-4)
    # the base itself was not modified by merging
    assert torch.equal(gen.blocks[0].self_attn.q.base.weight, base.blocks[0].self_attn.q.weight)


def test_lightx2v_file_merges_to_the_same_model(base, inputs):
    from inference.lora import merge_loras

    gen = with_lora(base, rank=4, alpha=8)
    _random_adapters(gen)
    lora = lightx2v_lora(gen)
    assert lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].shape == (base.dim, 4)
    assert lora["diffusion_model.blocks.0.ffn.0.lora_down.weight"].shape == (4, base.dim)
    assert float(lora["diffusion_model.blocks.1.cross_attn.o.alpha"]) == 8.0
    model = copy.deepcopy(base)
    merge_loras(model, [(lora, 1.0)])  # inference applies W + strength * alpha / r * up @ down
    want = merged(gen).state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_t2v_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("lora_dmd") / "run"
    trainer = trainer_for(dmd_cfg(run, tiny_t2v_dir, "max_steps=4", "dmd.dfake_gen_update_ratio=1",
                                  "optim.lr=1e-3", "dmd.lr_critic=1e-3", "dmd.ema_start=2", "checkpoint.every=2",
                                  *LORA))
    real0 = {k: v.clone() for k, v in trainer.real_score.state_dict().items()}
    trainer.train()
    torch.set_num_threads(n)
    return run, trainer, real0


def test_lora_dmd_trains_only_adapters(lora_run):
    run, trainer, real0 = lora_run
    for k, v in trainer.real_score.state_dict().items():  # the shared base (= the teacher) never changed
        assert torch.equal(v, real0[k]), k
    for name, opt in trainer.optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"]]
        assert params and all(p.requires_grad for p in params), name
        trainable = {id(p) for p in trainer.networks[name].parameters() if p.requires_grad}
        assert {id(p) for p in params} == trainable
    gen, critic = trainer.gen, trainer.critic
    assert gen.blocks[0].ffn[0].base.weight.data_ptr() == critic.blocks[0].ffn[0].base.weight.data_ptr() \
        == trainer.real_score.blocks[0].ffn[0].weight.data_ptr()
    assert gen.blocks[0].ffn[0].lora_up.weight.abs().sum() > 0  # the generator adapter moved
    assert set(trainer.ema.state_dict()) == {k for k, p in gen.named_parameters() if p.requires_grad}
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    for name in ("generator", "critic", "ema"):
        keys = set(load_file(str(ckpt / f"{name}.safetensors")))
        assert keys and all(".lora_up." in k or ".lora_down." in k for k in keys), name
    rows = by_step(metrics(run))
    assert all("generator_loss" in r and "critic_loss" in r for r in rows.values())


def test_lora_dmd_resume_is_exact(tmp_path, one_thread, tiny_t2v_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    train(dmd_cfg(full, tiny_t2v_dir, "max_steps=4", "dmd.dfake_gen_update_ratio=2", *LORA))
    train(dmd_cfg(part, tiny_t2v_dir, "max_steps=2", "dmd.dfake_gen_update_ratio=2", *LORA))
    train(dmd_cfg(part, tiny_t2v_dir, "max_steps=4", "dmd.dfake_gen_update_ratio=2", *LORA))
    assert "resumed from" in (part / "events.log").read_text()
    ref, got = by_step(metrics(full)), by_step(metrics(part))
    for step in range(1, 5):
        assert_same_metrics(ref[step], got[step])
    # a checkpoint made with another rank is refused with the reason
    with pytest.raises(KeyError, match="lora.rank"):
        train(dmd_cfg(part, tiny_t2v_dir, "max_steps=5", "dmd.dfake_gen_update_ratio=2", "lora.enabled=true",
                      "lora.rank=2"))


def test_lora_dmd_export_folder_and_adapter_file(lora_run, tiny_t2v_dir, tmp_path):
    from inference.lora import merge_loras

    run, trainer, _ = lora_run
    folder = run / "model"
    student = load_dit(folder, distill=True)
    lora_file = folder / "lora" / "distill_lora_r4.safetensors"
    lora = load_file(str(lora_file))
    assert all(k.startswith("diffusion_model.blocks.") for k in lora)
    teacher = load_dit(tiny_t2v_dir)
    merge_loras(teacher, [(lora, 1.0)])  # the adapter file on the base teacher = the exported full student
    for k, v in student.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[k], v.float(), rtol=1e-5, atol=1e-5, msg=k)
    # the export CLI on a LoRA-mode run: the same merged student and the adapter itself (no SVD, own rank)
    out, cli_lora = tmp_path / "student", tmp_path / "lora.safetensors"
    res = subprocess.run([sys.executable, "-m", "distill.export", "--run", str(run), "--out", str(out), "--dtype",
                          "fp32", "--lora", str(cli_lora)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cli_student = load_dit(out, distill=True).state_dict()
    for k, v in student.state_dict().items():
        torch.testing.assert_close(cli_student[k], v.float(), rtol=1e-5, atol=1e-5, msg=k)
    got = load_file(str(cli_lora))
    assert set(got) == set(lora)
    for k, v in lora.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0, msg=k)
