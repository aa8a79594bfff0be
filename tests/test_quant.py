"""Quantized DiT weights (inference/quantized.py; converter inference/quant.py): the per-channel arithmetic and its
error bounds, the LightX2V file layout, QuantLinear, memory, the converter CLI on the tiny student, loading through
the inference config, runtime LoRA on a quantized base, clear errors, and (slow) evaluator accuracy of the quantized
vs the unquantized student."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.evaluate import evaluate_video
from data.shapes import PROMPTS
from inference.config import load_config
from inference.loader import REPO_ROOT, load_pipeline
from inference.lora import LoraError, _is_linear_like, merge_loras, runtime_loras
from inference.quant import main
from inference.quantized import (
    QuantError,
    QuantLinear,
    dequantize_weight,
    load_quantized_dit,
    module_bytes,
    projected_bytes,
    quantize_model,
    quantize_state_dict,
    quantize_weight,
)
from models.loading import DIT_WEIGHTS, read_state_dict, write_safetensors
from models.wan_model import WanModel

pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT = REPO_ROOT / "configs/infer/tiny/t2v_distill_4step.json"
STUDENT_INT8 = REPO_ROOT / "configs/infer/tiny/t2v_distill_4step_int8.json"
TEACHER_LORA = REPO_ROOT / "configs/infer/tiny/t2v_distill_4step_lora.json"
PROMPTS_8 = PROMPTS[::12]  # 8 prompts over all colours / shapes / directions
QDTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
I2V = dict(model_type="i2v", text_len=8, in_dim=36, dim=32, ffn_dim=64, freq_dim=32, out_dim=16, num_heads=2,
           num_layers=2, text_dim=16, clip_dim=16)
TARGET_KINDS = {f"self_attn.{n}" for n in "qkvo"} | {f"cross_attn.{n}" for n in [*"qkvo", "k_img", "v_img"]} | {
    "ffn.0", "ffn.2"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def run_cli(argv: list[str]) -> tuple[dict, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = main(argv)
    return res, buf.getvalue()


@pytest.fixture(scope="module")
def student_quant(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The converter CLI run twice on the tiny student into one folder (distill_int8/ and distill_fp8/)."""
    out = tmp_path_factory.mktemp("student-quant")
    logs = {s: run_cli(["--config", str(STUDENT), "--out", str(out), "--scheme", s])[1] for s in QDTYPES}
    return out, logs


@pytest.fixture(scope="module")
def student_videos() -> np.ndarray:
    return load_pipeline(STUDENT).generate(PROMPTS_8, seed=1)


# ---- arithmetic ----------------------------------------------------------------------------------
def weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 40, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)  # rows of very different ranges
    w[5] = 0  # an all-zero row
    w[7, 3] = 50.0  # an outlier dominates its row's scale
    return w


def test_int8_scale_formula_and_half_step_error_bound():
    w = weight()
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (24, 1)
    torch.testing.assert_close(scale, w.abs().amax(1, keepdim=True) / 127, rtol=0, atol=0)
    assert q.abs().max() == 127 and q.min() >= -127  # symmetric: -128 is never used
    assert (q[5] == 0).all() and scale[5] == 0  # a zero row stays exactly zero
    err = (w - dequantize_weight(q, scale)).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all()  # rounding to the nearest code: at most half a step
    assert err.max() > 0


def test_fp8_scale_formula_and_relative_error_bound():
    w = weight()
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (24, 1)
    torch.testing.assert_close(scale, w.abs().amax(1, keepdim=True) / 448, rtol=0, atol=0)
    nonzero = scale.squeeze(1) > 0
    assert (q.float().abs().amax(1)[nonzero] == 448).all()  # each row's largest entry maps to fp8's largest value
    err = (w - dequantize_weight(q, scale)).abs()
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal codes; subnormal codes (< 2^-6) have step 2^-9
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert torch.isfinite(q.float()).all()


def test_unknown_scheme_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'int4'; expected one of \['int8', 'fp8'\]"):
        quantize_weight(torch.randn(4, 4), "int4")
    with pytest.raises(ValueError, match=r"dit_quant_scheme must be one of \['int8', 'fp8'\], got 'int4'"):
        load_config(STUDENT, dit_quantized=True, dit_quant_scheme="int4")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        main(["--config", str(STUDENT), "--out", str(tmp_path), "--scheme", "int4"])
    assert "invalid choice: 'int4'" in err.getvalue()


# ---- layout --------------------------------------------------------------------------------------
def tiny_i2v() -> WanModel:
    torch.manual_seed(0)
    model = WanModel.from_config(I2V).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("scheme", list(QDTYPES))
def test_quantized_state_dict_layout(scheme):
    model = tiny_i2v()
    state = model.state_dict()
    qstate, errors = quantize_state_dict(state, scheme)
    names = sorted(errors)
    assert {n.split(".", 2)[2] for n in names} == TARGET_KINDS  # I2V: k_img / v_img included
    assert len(names) == len(TARGET_KINDS) * I2V["num_layers"]
    assert set(qstate) == set(state) | {f"{n}.weight_scale" for n in names}
    for n in names:
        w, q, s = state[f"{n}.weight"], qstate[f"{n}.weight"], qstate[f"{n}.weight_scale"]
        assert q.dtype == QDTYPES[scheme] and q.shape == w.shape
        assert s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
    untouched = set(state) - {f"{n}.weight" for n in names}
    assert any(k.startswith("img_emb.") for k in untouched) and "head.head.weight" in untouched
    for k in untouched:  # biases, norms, modulation, embeddings, head, img_emb: the very same tensors
        assert qstate[k] is state[k]


def test_quantize_model_replaces_only_the_targets_and_keeps_its_state_dict_layout():
    model = tiny_i2v()
    errors = quantize_model(model, "int8")
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quant == set(errors) and len(quant) == len(TARGET_KINDS) * I2V["num_layers"]
    assert isinstance(model.text_embedding[0], nn.Linear) and isinstance(model.img_emb.proj[1], nn.Linear)
    assert set(model.state_dict()) == set(quantize_state_dict(tiny_i2v().state_dict(), "int8")[0])


# ---- the module ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", list(QDTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_equals_linear_with_dequantized_weight(scheme, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    q = QuantLinear.from_linear(lin, scheme).to(dtype)
    assert q.weight.dtype == QDTYPES[scheme] and q.weight_scale.dtype == torch.float32  # the cast left them alone
    assert q.bias.dtype == dtype
    x = torch.randn(2, 7, 48, dtype=dtype)
    ref = F.linear(x, dequantize_weight(q.weight, q.weight_scale, dtype), q.bias)
    assert torch.equal(q(x), ref)
    assert _is_linear_like(q)  # runtime LoRAs hook it like an nn.Linear
    # and it stays close to the float layer
    torch.testing.assert_close(q.float()(x.float()), lin(x.float()), rtol=0, atol=0.05 if scheme == "fp8" else 0.01)


@pytest.mark.parametrize("scheme,tol", [("int8", 0.02), ("fp8", 0.06)])
def test_w8a8_kernel_path_agrees_with_dequantized_path(scheme, tol):
    """The CUDA path (per-token fp8/int8 activations; torch._scaled_mm / torch._int_mm), run where torch has the
    kernel for this device: it differs from the weight-only path by the activation rounding only."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 48), scheme).to(torch.bfloat16)
    x = torch.randn(3, 20, 64, dtype=torch.bfloat16)
    try:
        y = q._forward_w8a8(x)
    except RuntimeError as e:
        pytest.skip(f"no {scheme} W8A8 kernel on this device: {e}")
    ref = q(x)  # on the CPU: dequantize
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert ((y.float() - ref.float()).norm() / ref.float().norm()) < tol


def test_weight_memory_fp32_bf16_int8_fp8(student_quant):
    out, _ = student_quant
    fp = load_pipeline(STUDENT).dit
    state = {k: v for k, v in fp.state_dict().items()}
    fp32, bf16 = projected_bytes(state, torch.float32), projected_bytes(state, torch.bfloat16)
    assert module_bytes(fp.float()) == fp32 == 2 * bf16
    for scheme in QDTYPES:
        q = load_quantized_dit(out, distill=True, dtype=torch.bfloat16, scheme=scheme)
        assert module_bytes(q) == projected_bytes(state, torch.bfloat16, scheme) < 0.6 * bf16
        lins = [m for m in q.modules() if isinstance(m, QuantLinear)]
        qbytes = sum(m.weight.nbytes + m.weight_scale.nbytes for m in lins)
        bf16_bytes = sum(2 * m.weight.numel() for m in lins)
        assert 0.5 < qbytes / bf16_bytes < 0.52  # 1 byte per weight + 4 bytes per output channel


# ---- converter, loading, generation --------------------------------------------------------------
def test_converter_cli_writes_a_loadable_folder_and_reports(student_quant):
    out, logs = student_quant
    assert (out / "config.json").is_file() and (out / "components.json").is_file()
    for name in json.loads((out / "components.json").read_text()).values():
        if "file" in name:
            assert (out / name["file"]).is_file()
    for scheme, log in logs.items():
        assert (out / f"distill_{scheme}" / DIT_WEIGHTS).is_file()
        assert "distill_models/distill_model.safetensors" in log
        for kind in TARGET_KINDS - {"cross_attn.k_img", "cross_attn.v_img"}:
            assert f"| {kind} | " in log
        assert "max rel. error" in log and "| bf16 |" in log and "| int8 (rest bf16) |" in log
        assert "DiT weights:" in log and "MiB ->" in log
        state = read_state_dict(out / f"distill_{scheme}" / DIT_WEIGHTS)
        assert state["blocks.0.ffn.0.weight"].dtype == QDTYPES[scheme]
        pipe = load_pipeline(STUDENT, model_path=out, dit_quantized=True, dit_quant_scheme=scheme)
        ffn = pipe.dit.blocks[0].ffn[0]
        assert isinstance(ffn, QuantLinear) and ffn.weight.dtype == QDTYPES[scheme]
        assert pipe.dit.weights_source.endswith(f"distill_{scheme}/{DIT_WEIGHTS}")
    # the shipped int8 config is the student's with the quantized folder
    cfg, student = load_config(STUDENT_INT8), load_config(STUDENT)
    assert cfg.dit_quantized and cfg.dit_quant_scheme == "int8"
    assert cfg.replace(model_path=student.model_path, dit_quantized=False, dit_quant_scheme=None) == student


@pytest.mark.parametrize("scheme,min_psnr", [("int8", 38.0), ("fp8", 27.0)])
def test_quantized_student_generates_close_to_the_unquantized_one(student_quant, student_videos, scheme, min_psnr):
    out, _ = student_quant
    pipe = load_pipeline(STUDENT_INT8, model_path=out, dit_quant_scheme=scheme)
    videos = pipe.generate(PROMPTS_8, seed=1)
    assert videos.shape == student_videos.shape
    assert psnr(videos, student_videos) >= min_psnr
    keys = ("colour", "shape", "direction", "valid", "joint_correct")
    ref = [evaluate_video(v, p) for v, p in zip(student_videos, PROMPTS_8)]
    got = [evaluate_video(v, p) for v, p in zip(videos, PROMPTS_8)]
    agree = np.mean([r[k] == g[k] for r, g in zip(ref, got) for k in keys])
    assert agree >= 0.8, f"the evaluator reads the quantized videos differently: {agree:.0%} agreement"
    assert abs(sum(r["joint_correct"] for r in ref) - sum(g["joint_correct"] for g in got)) <= 1


def test_runtime_lora_on_quantized_base_matches_merge_then_quantize(tmp_path):
    merged, base = tmp_path / "merged", tmp_path / "base"
    _, log = run_cli(["--config", str(TEACHER_LORA), "--out", str(merged), "--scheme", "int8"])  # merges its LoRA
    assert "merged LoRA" in log and (merged / "int8" / DIT_WEIGHTS).is_file()
    lora_file = load_config(TEACHER_LORA).lora_configs[0].path
    teacher = REPO_ROOT / load_config(TEACHER_LORA).model_path
    run_cli(["--model_path", str(teacher), "--out", str(base), "--scheme", "int8"])
    quant = dict(dit_quantized=True, dit_quant_scheme="int8")
    merged_pipe = load_pipeline(TEACHER_LORA, model_path=merged, lora_configs=[], **quant)
    with pytest.raises(LoraError, match="quantized"):  # a merge into int8 codes is refused, naming the way out
        load_pipeline(TEACHER_LORA, model_path=base, **quant)
    rt_pipe = load_pipeline(TEACHER_LORA, model_path=base, lora_mode="runtime", **quant)
    q = rt_pipe.dit.blocks[0].self_attn.q
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.int8 and q._forward_hooks  # hooked, not merged
    a, b = merged_pipe.generate(PROMPTS_8, seed=2), rt_pipe.generate(PROMPTS_8, seed=2)
    assert psnr(a, b) >= 33.0
    # strength 0 is the plain quantized base
    plain = load_pipeline(TEACHER_LORA, model_path=base, lora_configs=[], **quant).generate(PROMPTS_8[:2], seed=2)
    rt = runtime_loras(rt_pipe.dit)
    rt.set_strength(Path(lora_file).stem, 0.0)
    assert np.array_equal(rt_pipe.generate(PROMPTS_8[:2], seed=2), plain)
    with pytest.raises(LoraError, match="merge the LoRA before quantizing"):
        merge_loras(rt_pipe.dit, [(REPO_ROOT / lora_file, 1.0)])


# ---- errors --------------------------------------------------------------------------------------
def test_missing_weight_scale_keys_are_named(student_quant, tmp_path):
    out, _ = student_quant
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("distill_fp8"))
    path = broken / "distill_int8" / DIT_WEIGHTS
    state = read_state_dict(path)
    del state["blocks.1.cross_attn.v.weight_scale"], state["blocks.3.ffn.2.weight_scale"]
    write_safetensors(state, path)
    with pytest.raises(QuantError, match=r"lacks 2 weight_scale key\(s\): blocks\.1\.cross_attn\.v\.weight_scale, "
                                         r"blocks\.3\.ffn\.2\.weight_scale"):
        load_pipeline(STUDENT_INT8, model_path=broken)


def test_dit_quantized_on_a_folder_without_quantized_weights_names_the_expected_path(student_quant):
    folder = REPO_ROOT / load_config(STUDENT).model_path
    expected = str(folder / "distill_int8" / DIT_WEIGHTS)
    with pytest.raises(FileNotFoundError, match="no int8 DiT weights") as err:
        load_pipeline(STUDENT_INT8, model_path=folder)
    assert expected in str(err.value) and "python -m inference.quant" in str(err.value)
    out, _ = student_quant
    with pytest.raises(QuantError, match="does not hold int8 weights"):  # fp8 file, int8 scheme
        load_pipeline(STUDENT_INT8, model_path=out, dit_quantized_ckpt=str(out / "distill_fp8"))
    plain = folder / "distill_models" / "distill_model.safetensors"
    with pytest.raises(QuantError, match="holds no quantized weights"):
        load_pipeline(STUDENT_INT8, model_path=out, dit_quantized_ckpt=str(plain))


# ---- slow: evaluator accuracy over all 96 prompts ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(QDTYPES))
def test_quantized_student_joint_accuracy_within_2_points(student_quant, scheme):
    from benchmarks.quality import parse_spec, pick_prompts, run_config

    out, _ = student_quant
    prompts = pick_prompts(96)
    ref, _ = run_config(parse_spec(str(STUDENT)), prompts, seeds=1, batch=16)
    quant, _ = run_config(parse_spec(f"{STUDENT_INT8}:model_path={out},dit_quant_scheme={scheme}"), prompts,
                          seeds=1, batch=16)
    assert abs(quant["joint_acc"] - ref["joint_acc"]) <= 0.02
    for key in ("colour_acc", "shape_acc", "direction_acc"):
        assert abs(quant[key] - ref[key]) <= 0.05, (key, quant[key], ref[key])
