"""DiT block / phase / model offload, lazy loading from safetensors, quantized and LoRA weights under offload,
and the text encoder / CLIP / VAE stage offload of the pipeline (inference/offload.py).

On a CPU the device copy of a unit is the host tensor itself, so the offloaded forward runs the same kernels on the
same tensors as the resident one: outputs are compared with atol 1e-6 (no reordering of any reduction happens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.lora import merge_loras, runtime_loras
from inference.offload import (
    GRANULARITIES,
    enable_offload,
    is_placeholder,
    load_dit_lazy,
    offloader,
)
from inference.quantized import quantize_model, quantize_state_dict
from models.loading import write_dit_folder, write_safetensors
from tests.lora_util import I2V, T2V, inputs, make_lora, run, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 4
TOL = dict(rtol=0, atol=1e-6)


def model4(cfg: dict = T2V, seed: int = 0):
    return tiny(dict(cfg, num_layers=LAYERS), seed)


def live_host_bytes(model: torch.nn.Module) -> int:
    """Bytes of the CPU storages the model's parameters and buffers point to, and of the copies its offloader
    has in flight, each storage once."""
    storages = {}
    off = offloader(model)
    pending = [t for u in (off.units if off else []) if u.pending for t in u.pending[0]]
    for t in [*model.parameters(), *model.buffers(), *pending]:
        if t.device.type == "cpu":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def block_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.blocks[0].parameters(), *model.blocks[0].buffers()])


# ---- equality with the resident model --------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_offloaded_forward_equals_resident(granularity, cfg):
    model = model4(cfg)
    x = inputs(model)
    ref = run(model, x)
    off = enable_offload(model, "cpu", granularity)
    torch.testing.assert_close(run(model, x), ref, **TOL)
    torch.testing.assert_close(run(model, x), ref, **TOL)  # second step: the cyclic prefetch of unit 0
    per_block = {"block": 1, "phase": 3, "model": 0}[granularity]
    expected = [u.name for u in off.units] * 2
    assert off.stats.order == expected
    assert len(off.units) == (1 if granularity == "model" else per_block * LAYERS)
    assert off.stats.max_active == 1  # one unit computes; the next is only in flight
    off.release()
    assert not any(u.active or u.pending for u in off.units)


def test_phase_units_split_a_block_into_attention_cross_attention_ffn():
    model = model4(I2V)
    off = enable_offload(model, "cpu", "phase")
    keys = {u.name: sorted(s.key for s in u.slots) for u in off.units[:3]}
    assert keys["blocks.0.self_attn"] == sorted(
        ["blocks.0.modulation"] + [f"blocks.0.self_attn.{n}" for n in
                                   ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight",
                                    "o.bias", "norm_q.weight", "norm_k.weight")])
    assert all(k.startswith(("blocks.0.cross_attn.", "blocks.0.norm3.")) for k in keys["blocks.0.cross_attn"])
    assert "blocks.0.cross_attn.k_img.weight" in keys["blocks.0.cross_attn"]
    assert all(k.startswith(("blocks.0.ffn.", "blocks.0.norm2.")) for k in keys["blocks.0.ffn"])
    n_block = len(model.blocks[0].state_dict())
    assert sum(len(v) for v in keys.values()) == n_block


def test_unknown_granularity_is_an_error_naming_the_choices():
    model = model4()
    with pytest.raises(ValueError, match=r"offload_granularity must be one of \['block', 'phase', 'model'\].*'layer'"):
        enable_offload(model, "cpu", "layer")
    assert offloader(model) is None and not model.blocks[0]._forward_pre_hooks  # nothing was attached


def test_offload_twice_is_an_error():
    model = model4()
    enable_offload(model, "cpu")
    with pytest.raises(ValueError, match="already enabled"):
        enable_offload(model, "cpu")


def test_remove_restores_a_plain_model():
    model = model4()
    x = inputs(model)
    ref = run(model, x)
    off = enable_offload(model, "cpu", "phase")
    off.remove()
    assert offloader(model) is None and not model.blocks[0]._forward_pre_hooks
    torch.testing.assert_close(run(model, x), ref, **TOL)


# ---- lazy loading ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    model = model4()
    folder = write_dit_folder(tmp_path_factory.mktemp("dit"), model)
    return folder, model


@pytest.mark.parametrize("granularity", ["block", "phase"])
def test_lazy_load_equals_resident_and_keeps_host_tensors_bounded(dit_folder, granularity):
    folder, resident = dit_folder
    x = inputs(resident)
    ref = run(resident, x)
    lazy = load_dit_lazy(folder)
    assert all(is_placeholder(t) for n, t in lazy.state_dict().items() if n.startswith("blocks."))
    outside = live_host_bytes(lazy)
    n_block_tensors = sum(n.startswith("blocks.") for n in resident.state_dict())
    nonblock = sum(t.numel() * t.element_size() for n, t in resident.state_dict().items()
                   if not n.startswith("blocks."))
    assert outside <= nonblock + 4 * n_block_tensors  # nothing of the blocks was read (a placeholder: 1 element)
    enable_offload(lazy, "cpu", granularity, lazy.lazy_files)
    peaks = []
    for block in lazy.blocks:  # registered after the offloader's hooks: sees the state a block computes in
        block.register_forward_pre_hook(lambda m, a: peaks.append(live_host_bytes(lazy)))
    torch.testing.assert_close(run(lazy, x), ref, **TOL)
    # live: what lies outside the blocks + the unit computing + the unit in flight (at most two blocks)
    assert max(peaks) <= outside + 2 * block_bytes(resident)
    assert max(peaks) >= outside + block_bytes(resident) // (4 if granularity == "phase" else 1)
    # the whole model, for contrast: every block stays in host memory without lazy_load
    eager = model4()
    enable_offload(eager, "cpu", granularity)
    assert live_host_bytes(eager) == nonblock + LAYERS * block_bytes(resident)


def test_lazy_load_reads_sharded_checkpoints(tmp_path, dit_folder):
    """The 14B layout: diffusion_pytorch_model-0000i-of-00002.safetensors + .safetensors.index.json."""
    import json

    folder, resident = dit_folder
    sharded = write_dit_folder(tmp_path / "sharded", resident)
    (sharded / "diffusion_pytorch_model.safetensors").unlink()
    state = resident.state_dict()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        write_safetensors({k: state[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    lazy = load_dit_lazy(sharded)
    assert {p.name for p in lazy.lazy_files.values()} == set(weight_map.values())
    enable_offload(lazy, "cpu", "block", lazy.lazy_files)
    x = inputs(resident)
    torch.testing.assert_close(run(lazy, x), run(resident, x), **TOL)


def test_lazy_load_casts_like_the_full_loader(dit_folder):
    folder, resident = dit_folder
    lazy = load_dit_lazy(folder, dtype=torch.bfloat16)
    assert lazy.patch_embedding.weight.dtype == torch.bfloat16
    assert lazy.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    off = enable_offload(lazy, "cpu", "block", lazy.lazy_files)
    off.enter(0)
    assert torch.equal(lazy.blocks[0].self_attn.q.weight, resident.blocks[0].self_attn.q.weight.bfloat16())


def test_lazy_load_rejects_a_checkpoint_that_does_not_match(tmp_path, dit_folder):
    folder, resident = dit_folder
    bad = write_dit_folder(tmp_path / "bad", resident)
    state = {k: v for k, v in resident.state_dict().items() if k != "blocks.1.ffn.0.weight"}
    write_safetensors(state, bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing key\(s\).*blocks\.1\.ffn\.0\.weight"):
        load_dit_lazy(bad)


def test_lazy_load_needs_safetensors(tmp_path, dit_folder):
    folder, resident = dit_folder
    torch.save(resident.state_dict(), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="safetensors"):
        load_dit_lazy(folder, explicit=str(tmp_path / "dit.pt"))


# ---- quantized weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantized_dit_under_offload(scheme, granularity):
    model = model4()
    quantize_model(model, scheme)
    x = inputs(model)
    ref = run(model, x)
    enable_offload(model, "cpu", granularity)
    torch.testing.assert_close(run(model, x), ref, **TOL)


def test_quantized_dit_lazy_loaded(tmp_path, dit_folder):
    folder, resident = dit_folder
    qstate, _ = quantize_state_dict(resident.state_dict(), "int8")
    qfolder = write_dit_folder(tmp_path, resident)
    write_safetensors(qstate, qfolder / "int8" / "diffusion_pytorch_model.safetensors")
    quantized = model4()
    quantize_model(quantized, "int8")
    x = inputs(quantized)
    ref = run(quantized, x)
    lazy = load_dit_lazy(qfolder, scheme="int8")
    assert lazy.blocks[0].ffn[0].weight.dtype == torch.int8 and is_placeholder(lazy.blocks[0].ffn[0].weight)
    enable_offload(lazy, "cpu", "block", lazy.lazy_files)
    torch.testing.assert_close(run(lazy, x), ref, **TOL)


# ---- LoRA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_runtime_lora_switching_under_offload(granularity):
    """A LoRA touching every tensor (block modulations become parametrizations of offloaded parameters),
    attached after offload: switched on, re-weighted, off and removed between forwards."""
    base, model = model4(), model4()
    lora = make_lora(base, rank=2)
    x = inputs(base)
    ref_base = run(base, x)
    rt_ref = runtime_loras(base)
    rt_ref.add(lora, 1.0, name="a")
    ref_on = run(base, x)
    rt_ref.set_strength("a", 0.5)
    ref_half = run(base, x)

    enable_offload(model, "cpu", granularity)
    rt = runtime_loras(model)
    rt.add(lora, 1.0, name="a")
    torch.testing.assert_close(run(model, x), ref_on, **TOL)
    rt.set_strength("a", 0.5)
    torch.testing.assert_close(run(model, x), ref_half, **TOL)
    rt.set_strength("a", 0.0)
    torch.testing.assert_close(run(model, x), ref_base, **TOL)
    rt.remove("a")
    torch.testing.assert_close(run(model, x), ref_base, **TOL)


def test_runtime_lora_on_a_lazy_loaded_quantized_dit(tmp_path, dit_folder):
    folder, resident = dit_folder
    qstate, _ = quantize_state_dict(resident.state_dict(), "fp8")
    write_safetensors(qstate, folder / "fp8" / "diffusion_pytorch_model.safetensors")
    quantized = model4()
    quantize_model(quantized, "fp8")
    lora = make_lora(resident, rank=2, only="blocks.")
    runtime_loras(quantized).add(lora, 0.7, name="a")
    x = inputs(quantized)
    ref = run(quantized, x)
    lazy = load_dit_lazy(folder, scheme="fp8")
    enable_offload(lazy, "cpu", "phase", lazy.lazy_files)
    runtime_loras(lazy).add(lora, 0.7, name="a")
    torch.testing.assert_close(run(lazy, x), ref, **TOL)


def test_merged_lora_under_offload():
    base, model = model4(), model4()
    lora = make_lora(base, rank=2)
    merge_loras(base, [(lora, 0.8)])
    x = inputs(base)
    enable_offload(model, "cpu", "block")
    merge_loras(model, [(lora, 0.8)])  # merges into the host copies the blocks rest in
    torch.testing.assert_close(run(model, x), run(base, x), **TOL)


# ---- the pipeline ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_pipeline_with_every_offload_equals_the_resident_pipeline(task, tiny_t2v_dir, tiny_i2v_dir, make_config):
    from inference.loader import load_pipeline

    folder = tiny_t2v_dir if task == "t2v" else tiny_i2v_dir
    image = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy() if task == "i2v" else None
    ref = load_pipeline(make_config(task, infer_steps=2), model_path=folder).generate("a red circle", image=image)
    cfg = make_config(task, infer_steps=2, cpu_offload=True, offload_granularity="phase", lazy_load=True,
                      t5_cpu_offload=True, clip_cpu_offload=True, vae_cpu_offload=True)
    pipe = load_pipeline(cfg, model_path=folder)
    entered = []
    stage = pipe.offload.stage
    pipe.offload.stage = lambda *names: (entered.append(names), stage(*names))[1]
    out = pipe.generate("a red circle", image=image)
    assert (out.astype(int) - ref.astype(int)).__abs__().max() <= 1  # uint8 frames: one level of rounding
    expected = [("text_encoder",)] + ([("image_encoder", "vae")] if task == "i2v" else []) + [("vae",)]
    assert entered == expected
    assert offloader(pipe.dit).granularity == "phase" and offloader(pipe.dit).lazy
    assert not any(u.active for u in offloader(pipe.dit).units)  # released after the denoising stage


def test_loader_quantized_lazy_offload_with_a_runtime_lora(tiny_t2v_dir, make_config, tmp_path):
    """Through load_pipeline: an int8 DiT read lazily, phase offload and a runtime LoRA from lora_configs give the
    video of the same int8 DiT resident with the same LoRA."""
    import shutil

    from models.loading import read_state_dict

    folder = Path(shutil.copytree(tiny_t2v_dir, tmp_path / "folder"))
    qstate, _ = quantize_state_dict(read_state_dict(folder / "diffusion_pytorch_model.safetensors"), "int8")
    write_safetensors(qstate, folder / "int8" / "diffusion_pytorch_model.safetensors")
    lora_path = tmp_path / "style.safetensors"
    write_safetensors(make_lora(tiny(dict(T2V, dim=64, ffn_dim=128, num_layers=2, text_len=64, text_dim=64)),
                                rank=2, only="blocks."), lora_path)
    common = dict(infer_steps=2, dit_quantized=True, dit_quant_scheme="int8", lora_mode="runtime",
                  lora_configs=[{"path": str(lora_path), "strength": 0.8}])
    from inference.loader import load_pipeline

    ref = load_pipeline(make_config(**common), model_path=folder).generate("a red circle")
    pipe = load_pipeline(make_config(**common, cpu_offload=True, offload_granularity="phase", lazy_load=True),
                         model_path=folder)
    assert offloader(pipe.dit).lazy and runtime_loras(pipe.dit).names == ["style"]
    out = pipe.generate("a red circle")
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1  # uint8 frames: one level of rounding


def test_component_offload_keeps_the_modules_and_ignores_other_stages():
    from inference.offload import ComponentOffload

    torch.manual_seed(0)
    vae, text = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    weight, x = vae.weight, torch.randn(2, 4)
    ref = vae(x)
    co = ComponentOffload("cpu", {"vae": vae})
    with co.stage("vae", "image_encoder"):  # image_encoder is not managed here: nothing happens to it
        assert co.units["vae"].active
        torch.testing.assert_close(vae(x), ref, **TOL)
        assert text.weight.device.type == "cpu"
    assert not co.units["vae"].active and vae.weight is weight  # the same Parameter, back on its host copy
    assert [s.key for s in co.units["vae"].slots] == ["weight", "bias"]


def test_config_rules_of_the_offload_keys(make_config):
    with pytest.raises(ValueError, match="offload_granularity must be one of"):
        make_config(cpu_offload=True, offload_granularity="layer")
    with pytest.raises(ValueError, match="lazy_load .* needs cpu_offload"):
        make_config(lazy_load=True)
    with pytest.raises(ValueError, match="lora_mode 'runtime'"):
        make_config(cpu_offload=True, lazy_load=True, lora_configs=[{"path": "a.safetensors"}])


# ---- the GPU script's CPU mode ---------------------------------------------------------------------------
def test_gpu_inference_check_runs_its_tiny_geometry_on_the_cpu(tmp_path, capsys):
    """benchmarks/infer_gpu_check.py (scripts/gpu_inference_check.sh) at the tiny geometry: every number is
    written, the offloaded DiT gives the resident output, the teacher's denoising is scaled to 50 steps."""
    import json

    from benchmarks.infer_gpu_check import main

    result = main(["--geometry", "tiny", "--device", "cpu", "--out", str(tmp_path / "check")])
    capsys.readouterr()
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["dit"]["max_abs_diff_vs_resident"] <= 1e-6 and result["dit"]["units_copied_ahead"] >= 3
    assert saved["dit"]["ratio_offloaded_over_resident"] > 0 and saved["dit"]["resident_peak_gib"] is None
    student, teacher = saved["end_to_end"]["student_4step"], saved["end_to_end"]["teacher_cfg"]
    assert student["nfe"] == 4 and teacher["nfe"] == 100 and teacher["scaled_from_steps"] == 2
    assert set(student["stages_s"]) == {"text_encoder", "image_encoder", "dit", "vae_decode"}
    assert saved["end_to_end"]["speedup_teacher_over_student"] == teacher["total_s"] / student["total_s"]


def test_gpu_inference_check_refuses_the_real_geometry_on_a_cpu(tmp_path):
    from benchmarks.infer_gpu_check import main

    with pytest.raises(ValueError, match="needs a CUDA device"):
        main(["--geometry", "real", "--device", "cpu", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--teacher-steps must be >= 1"):
        main(["--geometry", "tiny", "--teacher-steps", "0", "--out", str(tmp_path / "x")])
