"""`distill.export` (CPU, seconds): the Wan folder and the LightX2V LoRA of a finished DMD run, exact fp32 merges
through inference.lora, and the rank-r extraction (Eckart-Young)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.trainer_util import (
    REPO,
    dmd_cfg,
    train,
)


# ---- export: Wan folder + LightX2V LoRA -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dmd_run(tmp_path_factory, tiny_t2v_dir) -> Path:
    """A finished 4-iteration DMD run (generator updated every iteration, lr high enough for a visible delta)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("dmd") / "run"
    train(dmd_cfg(run, tiny_t2v_dir, "max_steps=4", "dmd.dfake_gen_update_ratio=1", "optim.lr=1e-3",
                  "dmd.ema_start=100"))
    torch.set_num_threads(n)
    return run


def _lora_module(key: str) -> tuple[str, str]:
    """'diffusion_model.blocks.0.self_attn.q.lora_up.weight' -> ('blocks.0.self_attn.q', 'lora_up')."""
    assert key.startswith("diffusion_model."), key
    name = key[len("diffusion_model."):]
    for suffix in (".lora_up.weight", ".lora_down.weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:-len(".weight")]
    module, _, suffix = name.rpartition(".")
    if name in ("diff", "diff_b", "diff_m"):
        return "", name
    assert suffix in ("diff", "diff_b", "diff_m"), key
    return module, suffix


def local_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """base + up @ down for LoRA pairs, base + diff for full differences (fp32)."""
    out = {k: v.float().clone() for k, v in base.items()}
    target = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
    for key, t in lora.items():
        module, kind = _lora_module(key)
        if kind == "lora_down":
            continue
        if kind == "lora_up":
            down = lora[key.replace(".lora_up.", ".lora_down.")]
            out[f"{module}.weight"] += t.float() @ down.float()
        else:
            name = f"{module}.{target[kind]}" if module else target[kind]
            out[name] += t.float()
    return out


def check_lora_file(path: Path, base: dict, student: dict, rank: int, tol: float) -> dict[str, float]:
    """LightX2V key format + merge(base, LoRA) reproduces the student within the reported errors (+ tol)."""
    lora = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lightx2v" and meta["rank"] == str(rank)
    errors = json.loads(path.with_suffix(".errors.json").read_text())
    kinds = {}
    for key, t in lora.items():
        module, kind = _lora_module(key)
        kinds[key] = kind
        if kind == "lora_up":
            w = base[f"{module}.weight"]
            assert t.shape == (w.shape[0], rank), key
            assert lora[key.replace(".lora_up.", ".lora_down.")].shape == (rank, w.shape[1]), key
            assert f"{module}.weight" in errors
        elif kind == "diff":
            assert base[f"{module}.weight"].shape == t.shape
    # the official Wan names of the modulation tensors
    assert lora["diffusion_model.blocks.0.diff_m"].shape == base["blocks.0.modulation"].shape
    assert lora["diffusion_model.head.diff_m"].shape == base["head.modulation"].shape
    assert "diffusion_model.blocks.1.self_attn.q.lora_up.weight" in lora
    assert "diffusion_model.blocks.0.ffn.2.lora_down.weight" in lora
    assert "diffusion_model.blocks.0.self_attn.q.diff_b" in lora
    assert "diffusion_model.blocks.0.norm3.diff" in lora and "diffusion_model.patch_embedding.diff" in lora
    # every 2-D weight (min_numel 1, rank < min dim) is a LoRA pair; the rest are full differences
    for name, w in base.items():
        if w.ndim == 2 and rank < min(w.shape) and not torch.equal(student[name], w):
            assert f"diffusion_model.{name[:-len('.weight')]}.lora_up.weight" in lora, name
    merged = local_merge(base, lora)
    for name, s in student.items():
        delta = (s.float() - base[name].float()).norm()
        err = (merged[name] - s.float()).norm()
        allowed = errors.get(name, 0.0) + tol
        assert err <= allowed * delta + 1e-6, (name, float(err / max(delta, 1e-30)), errors.get(name))
    return errors


def test_export_cli_folder_and_lora(dmd_run, tmp_path, tiny_t2v_dir, make_config):
    from inference.loader import load_pipeline
    from inference.schedule import StudentSchedule, read_schedule
    from models.components import load_dit

    out, lora = tmp_path / "student", tmp_path / "lora-r4.safetensors"
    cmd = [sys.executable, "-m", "distill.export", "--run", str(dmd_run), "--out", str(out), "--lora", str(lora),
           "--lora-rank", "4", "--lora-min-numel", "1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert (out / "distill_models" / "distill_model.safetensors").is_file() and (out / "config.json").is_file()
    # the export carries the run's schedule: a config without one adopts it (no hand-written step list)
    assert read_schedule(out) == StudentSchedule()
    pipe = load_pipeline(make_config("t2v", enable_cfg=False), out)
    assert pipe.cfg.schedule() == StudentSchedule()
    frames = pipe.generate(["a red circle moving left"], seed=0)
    assert frames.shape == (1, 5, 32, 32, 3)
    # bf16 (the default): the student file and the LoRA are bf16; the merge matches up to bf16 rounding
    lora_tensors = load_file(str(lora))
    assert {t.dtype for t in lora_tensors.values()} == {torch.bfloat16}
    base = load_dit(tiny_t2v_dir).state_dict()
    student = load_dit(out, distill=True).state_dict()
    errors = check_lora_file(lora, base, student, 4, tol=1e-2)
    assert errors and all(0 < e < 1 for e in errors.values())
    # the exported student is the run's generator (EMA not started yet: EMA == raw weights)
    raw = load_file(str(dmd_run / "checkpoints" / "step_00000004" / "generator.safetensors"))
    for k, v in raw.items():
        torch.testing.assert_close(student[k].float(), v.bfloat16().float())


def test_export_fp32_lora_merges_exactly_and_loads_with_inference_lora(dmd_run, tmp_path, tiny_t2v_dir):
    from distill.export import export
    from models.components import load_dit

    out, lora = tmp_path / "student", tmp_path / "lora.safetensors"
    export(dmd_run, out, dtype="fp32", lora=lora, lora_rank=4, lora_min_numel=1)
    base = load_dit(tiny_t2v_dir).state_dict()
    student = load_dit(out, distill=True).state_dict()
    assert {t.dtype for t in load_file(str(lora)).values()} == {torch.float32}
    check_lora_file(lora, base, student, 4, tol=1e-5)
    try:
        from inference.lora import merge_loras
    except ImportError:  # pragma: no cover - inference/lora.py not there yet
        return
    model = load_dit(tiny_t2v_dir)
    merge_loras(model, [(lora, 1.0)])
    mine = local_merge(base, load_file(str(lora)))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v.float(), mine[k], rtol=1e-6, atol=1e-6, msg=k)


def test_extract_lora_rank_r_exact_and_eckart_young():
    from distill.export import extract_lora

    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 48, 40, 5
    base = {"blocks.0.self_attn.q.weight": torch.randn(out_f, in_f, generator=g),
            "blocks.0.self_attn.q.bias": torch.randn(out_f, generator=g),
            "blocks.0.modulation": torch.randn(1, 6, 8, generator=g),
            "head.modulation": torch.randn(1, 2, 8, generator=g),
            "blocks.0.norm3.weight": torch.randn(8, generator=g),
            "text_embedding.0.weight": torch.randn(4, 3, generator=g),  # rank >= min dim: a full difference
            "unchanged.weight": torch.randn(6, 6, generator=g)}
    low = torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tuned["blocks.0.self_attn.q.weight"] = base["blocks.0.self_attn.q.weight"] + low
    tuned["unchanged.weight"] = base["unchanged.weight"].clone()

    lora, errors = extract_lora(base, tuned, rank=r, min_numel=1)
    p = "diffusion_model."
    assert set(lora) == {p + "blocks.0.self_attn.q.lora_up.weight", p + "blocks.0.self_attn.q.lora_down.weight",
                         p + "blocks.0.self_attn.q.diff_b", p + "blocks.0.diff_m", p + "head.diff_m",
                         p + "blocks.0.norm3.diff", p + "text_embedding.0.diff"}
    up, down = lora[p + "blocks.0.self_attn.q.lora_up.weight"], lora[p + "blocks.0.self_attn.q.lora_down.weight"]
    assert up.shape == (out_f, r) and down.shape == (r, in_f)
    assert errors["blocks.0.self_attn.q.weight"] < 1e-5
    assert (up @ down - low).norm() / low.norm() < 1e-5
    # balanced factors (no alpha): up = U sqrt(S), down = sqrt(S) V^T
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora[p + "blocks.0.diff_m"], tuned["blocks.0.modulation"] - base["blocks.0.modulation"])

    # a full-rank delta: the Eckart-Young optimum, error = ||S[r:]|| / ||S||
    full = torch.randn(out_f, in_f, generator=g)
    tuned["blocks.0.self_attn.q.weight"] = base["blocks.0.self_attn.q.weight"] + full
    s = torch.linalg.svdvals(full.double())
    for rank in (1, 5, 20):
        lora, errors = extract_lora(base, tuned, rank=rank, min_numel=1)
        expect = float(s[rank:].norm() / s.norm())
        assert errors["blocks.0.self_attn.q.weight"] == pytest.approx(expect, rel=1e-4)
        up, down = lora[p + "blocks.0.self_attn.q.lora_up.weight"], lora[p + "blocks.0.self_attn.q.lora_down.weight"]
        assert float((full - up @ down).norm() / full.norm()) == pytest.approx(expect, rel=1e-4)
        assert torch.linalg.matrix_rank(up @ down) == rank
    # the default min_numel (1M): small 2-D weights are full differences
    lora, errors = extract_lora(base, tuned, rank=5)
    assert not errors and p + "blocks.0.self_attn.q.diff" in lora
    with pytest.raises(ValueError, match="differ in keys"):
        extract_lora(base, {**tuned, "extra.weight": torch.zeros(1)})
