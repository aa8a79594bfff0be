"""Two-expert I2V DMD (Wan2.2 I2V-A14B: experts that take y and no CLIP features) on a mini official-layout folder:
the batches carry y from the pair's image and no CLIP features, train.py with the shipped YAML trains and exports
both experts, and infer.py runs the export with the shipped 4-step I2V config."""

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
from models.mini import write_mini
from train import trainer_for

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "configs/train/wan/i2v_a14b_dmd.yaml"
INFER = REPO / "configs/infer/wan22/wan22_moe_i2v_distill_4step.json"
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return write_mini(tmp_path_factory.mktemp("i2v_a14b") / "mini", "i2v", "official", moe=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(len(PROMPTS)):
        iio.imwrite(root / f"img{i}.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "image": f"img{i}.png"}) + "\n"
                                              for i, p in enumerate(PROMPTS)))
    return root / "pairs.jsonl"


def overrides(teacher: Path, pairs: Path, run: Path, *extra: str) -> list[str]:
    return [f"run_dir={run}", f"model.path={teacher}", f"data.prompt_path={pairs}", "data.text_store=null",
            "data.num_frames=5", "data.height=32", "data.width=32", "grad_accum=1", "mixed_precision='no'",
            "dmd.real_score_dtype=fp32", f"output_model={run}/model", "logging.wandb_mode=disabled", *extra]


def test_batches_carry_y_and_no_clip_features(teacher, pairs, tmp_path, one_thread):
    trainer = trainer_for(load_train_config(YAML, overrides(teacher, pairs, tmp_path / "run", "max_steps=1")))
    assert trainer.task == "i2v" and trainer.image_encoder is None
    cond, uncond, _, _, ti2v = trainer._batch(0, 0, 0)
    assert cond.clip_fea is None and ti2v is None
    z, f, h, w = trainer.latent_shape
    assert tuple(cond.y.shape) == (1, 4 + z, f, h, w) and uncond.y is cond.y  # the image is shared by both branches
    assert bool(torch.all(cond.y[:, :4, 0] == 1)) and bool(torch.all(cond.y[:, :4, 1:] == 0))  # mask on frame 0


def test_train_py_distils_i2v_a14b_and_infer_runs_the_export(teacher, pairs, tmp_path, one_thread):
    run = tmp_path / "run"
    assert train.main(["--config", str(YAML), *overrides(teacher, pairs, run, "max_steps=2",
                                                         "dmd.dfake_gen_update_ratio=1", "logging.sample_every=1",
                                                         "logging.sample_steps=4", "logging.sample_format=npy")]) == 0
    assert "I2V sample images: pairs [0, 1]" in (run / "events.log").read_text()
    for name in ("high_noise_model", "low_noise_model"):
        assert (run / "model" / "distill_models" / name / "distill_model.safetensors").is_file()
    config = tmp_path / "infer.json"
    config.write_text(json.dumps({**json.loads(INFER.read_text()), "target_video_length": 5, "target_height": 32,
                                  "target_width": 32}))
    assert infer.main(["--config", str(config), "--model_path", str(run / "model"), "--prompt", PROMPTS[0],
                       "--image_path", str(pairs.parent / "img0.png"), "--save_result_path",
                       str(tmp_path / "out.npy")]) == 0
    assert np.load(tmp_path / "out.npy").shape == (5, 32, 32, 3)
