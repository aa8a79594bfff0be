"""DMD of Wan2.2 TI2V-5B through the trainer (docs/wan22_ti2v.md "DMD for TI2V-5B"), on a mini TI2V folder
(models/mini_ti2v.py): the mixed T2V/I2V batches, train.py with the shipped YAML, the export, and infer.py running
the export in both tasks; the inputs that are refused before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import infer
import train
from distill.config import load_train_config
from distill.data import PromptBatches, TextCache, image_fraction, load_pairs
from distill.preflight import preflight
from inference.config import InferConfig
from inference.loader import load_pipeline
from inference.ti2v import first_frame_mask
from inference.ti2v_pipeline import fit_image
from models.components import load_encoders
from models.loading import DISTILL_DIR, read_state_dict
from models.mini_ti2v import write_mini_ti2v

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "configs/train/wan/ti2v_5b_dmd.yaml"
INFER = REPO / "configs/infer/wan22/wan22_ti2v_5b_distill_4step.json"
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle", "a white star"]
SIZE = dict(num_frames=5, height=64, width=96)  # TI2V sizes are multiples of 32; latent [48, 2, 4, 6]
LATENT = (48, 2, 4, 6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_mini_ti2v(tmp_path_factory.mktemp("ti2v_dmd") / "mini")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(PROMPTS):
        iio.imwrite(root / f"img{i}.png", rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
        rows.append(json.dumps({"prompt": p, "image": f"img{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return root / "pairs.jsonl"


def overrides(folder: Path, pairs: Path, run: Path, *extra: str) -> list[str]:
    return [f"run_dir={run}", f"model.path={folder}", f"data.prompt_path={pairs}", "data.text_store=null",
            *(f"data.{k}={v}" for k, v in SIZE.items()), "grad_accum=1", "mixed_precision='no'",
            "dmd.real_score_dtype=fp32", f"output_model={run}/model", "logging.wandb_mode=disabled", *extra]


def batches(folder: Path, pairs: Path, fraction: float, seed: int = 0) -> PromptBatches:
    vae, text_encoder, _ = load_encoders(folder, "t2v", 512)
    data = load_pairs(pairs)
    return PromptBatches(data.prompts, TextCache(text_encoder, data.prompts + [""], 512), seed, vae=vae,
                         images=data, image_fraction=fraction)


# ---- data: mixed batches ------------------------------------------------------------------------------------
def test_mixed_batch_encodes_the_chosen_samples_images_and_masks_only_their_frame_0(folder, pairs):
    data = batches(folder, pairs, fraction=0.5)
    cond, uncond, prompts, ti2v = data.get_ti2v(3, 0, 1, 8, LATENT)
    assert cond.context.shape[0] == uncond.context.shape[0] == 8 and cond.y is None and cond.clip_fea is None
    with_image = [not bool(torch.all(m == 1)) for m in ti2v.mask]
    assert 0 < sum(with_image) < 8  # both kinds in one batch at fraction 0.5 (this seed and step)
    rows, _ = data.draw(3, 0, 1, 8)
    for i, has in enumerate(with_image):
        if not has:
            assert torch.equal(ti2v.image_latent[i], torch.zeros(48, 1, 4, 6))
            continue
        assert torch.equal(ti2v.mask[i], first_frame_mask(2, 4, 6)[0])
        image = torch.from_numpy(data.images.image(rows[i])).permute(2, 0, 1).float()[None] / 127.5 - 1
        want = data.vae.encode(fit_image(image, 64, 96)[:, :, None]).float()[0]
        torch.testing.assert_close(ti2v.image_latent[i], want, rtol=1e-4, atol=1e-5)  # batched vs alone
    # the same (seed, step, micro, rank) gives the same choice and latents: exact resume
    again = data.get_ti2v(3, 0, 1, 8, LATENT)[3]
    assert torch.equal(again.mask, ti2v.mask) and torch.equal(again.image_latent, ti2v.image_latent)


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (1.0, 6)])
def test_fraction_0_is_text_only_and_1_conditions_every_sample(folder, pairs, fraction, expected):
    ti2v = batches(folder, pairs, fraction).get_ti2v(0, 0, 1, 6, LATENT)[3]
    assert sum(not bool(torch.all(m == 1)) for m in ti2v.mask) == expected
    assert ti2v.text_only == (expected == 0)


def test_image_fraction_defaults_and_refusals(tmp_path, folder, pairs):
    cfg = load_train_config(YAML, overrides(folder, pairs, tmp_path / "run", "data.image_fraction=null"))
    assert image_fraction(cfg, "ti2v") == 0.5 and image_fraction(cfg, "t2v") is None
    with pytest.raises(ValueError, match=r"data.image_fraction must be in \[0, 1\], got 1.5"):
        load_train_config(YAML, overrides(folder, pairs, tmp_path / "run", "data.image_fraction=1.5"))
    # a Wan2.1 teacher with the key set: an error naming it, before any model
    t2v = load_train_config(None, ["task=dmd", f"run_dir={tmp_path}/r2", "data.image_fraction=0.5",
                                   f"model.path={REPO}/checkpoints/tiny-t2v-teacher"])
    with pytest.raises(ValueError, match="data.image_fraction=0.5 applies to Wan2.2 TI2V-5B teachers only"):
        preflight(t2v)
    # ODE initialisation from a TI2V teacher is not built: refused by the preflight
    ode = load_train_config(YAML, overrides(folder, pairs, tmp_path / "r3", "task=ode"))
    with pytest.raises(ValueError, match="ODE initialisation from a Wan2.2 TI2V-5B teacher"):
        preflight(ode)


def test_text_only_prompt_list_needs_image_fraction_0(tmp_path, folder, pairs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_train_config(YAML, overrides(folder, prompts, tmp_path / "run"))  # image_fraction 0.5 (the YAML)
    from distill.data import source_data

    with pytest.raises(ValueError, match="set data.image_fraction=0 to train on the prompts alone"):
        source_data(cfg, "ti2v")
    cfg = load_train_config(YAML, overrides(folder, prompts, tmp_path / "run", "data.image_fraction=0"))
    assert source_data(cfg, "ti2v") == (PROMPTS, None, None)


# ---- train.py -> export -> infer.py ------------------------------------------------------------------------
def test_train_py_distils_a_ti2v_folder_and_infer_runs_the_export_in_both_tasks(tmp_path, folder, pairs):
    run = tmp_path / "run"
    # the run's four batches (2 steps x generator and critic phases, batch 2) hold both kinds of sample
    data = batches(folder, pairs, 0.5)
    kinds = {bool(torch.all(m == 1)) for i in range(4) for m in data.get_ti2v(i, 0, 1, 2, LATENT)[3].mask}
    assert kinds == {True, False}
    args = ["--config", str(YAML), *overrides(folder, pairs, run, "max_steps=2", "dmd.dfake_gen_update_ratio=1",
                                              "batch_size=2",
                                              "logging.sample_every=1", "logging.sample_steps=4",
                                              "logging.sample_format=npy")]
    assert train.main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["generator_loss"]) for r in rows)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        f"step000000{s}_{i}.npy" for s in (1, 2) for i in (0, 1)]
    export = run / "model"
    assert (export / "Wan2.2_VAE.pth").is_file() and (export / "schedule.json").is_file()
    student = read_state_dict(export / DISTILL_DIR / "distill_model.safetensors")
    teacher = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    assert student.keys() == teacher.keys() and any(not torch.equal(student[k], teacher[k]) for k in student)

    # the export loads its distilled weights through model_cls wan2.2 + the student's schedule
    pipe = load_pipeline(InferConfig(model_cls="wan2.2", model_path=str(export), denoising_step_list=[1000, 750, 500,
                                                                                                         250],
                                     sample_shift=5.0, enable_cfg=False, target_video_length=5, target_height=64,
                                     target_width=96, device="cpu"))
    for k, v in pipe.dit.state_dict().items():
        assert torch.equal(v, student[k].to(v.dtype)), k
    config = tmp_path / "infer.json"
    shipped = json.loads(INFER.read_text())
    config.write_text(json.dumps({**shipped, "target_video_length": 5, "target_height": 64, "target_width": 96}))
    common = ["--config", str(config), "--model_path", str(export), "--prompt", PROMPTS[0]]
    assert infer.main([*common, "--save_result_path", str(tmp_path / "t2v.npy")]) == 0
    assert infer.main([*common, "--task", "i2v", "--image_path", str(pairs.parent / "img0.png"),
                       "--save_result_path", str(tmp_path / "i2v.npy")]) == 0
    assert np.load(tmp_path / "t2v.npy").shape == np.load(tmp_path / "i2v.npy").shape == (5, 64, 96, 3)


def test_base_config_on_the_export_adopts_its_schedule_as_wan22(tmp_path, folder, pairs):
    """The TI2V base config (50 steps, CFG) on an exported student folder: the folder's schedule.json wins and the
    model class stays wan2.2 (a TI2V folder), so the distilled weights load."""
    from inference.loader import with_folder_schedule

    run = tmp_path / "run"
    assert train.main(["--config", str(YAML), *overrides(folder, pairs, run, "max_steps=1")]) == 0
    base = InferConfig(model_cls="wan2.2", model_path=str(run / "model"), infer_steps=50, enable_cfg=True)
    cfg = with_folder_schedule(base, run / "model")
    assert (cfg.model_cls, cfg.denoising_step_list, cfg.enable_cfg) == ("wan2.2", [1000, 750, 500, 250], False)

