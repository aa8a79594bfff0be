"""Prompt sources of distillation (text file, .txt folder, datasets folder, json/jsonl/csv/parquet), I2V
prompt/image pairs, and DMD runs that read them (T2V prompts; I2V with images of any size, batch 2)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from distill.config import load_train_config
from distill.data import load_pairs
from distill.prompts import load_prompts
from train import trainer_for

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left", "a blue square moving up", "a cyan triangle moving down"]
SMALL = ["data.num_frames=5", "data.height=32", "data.width=32", "num_threads=1", "logging.every=1",
         "logging.sample_prompts=[]", "checkpoint.every=100", "batch_size=2", "max_steps=2",
         "dmd.dfake_gen_update_ratio=1"]


def test_every_prompt_source_reads_the_same_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, p in enumerate(PROMPTS):
        (folder / f"{i:03d}.txt").write_text(p + "\n")
    rows = [{"prompt": p, "other": i} for i, p in enumerate(PROMPTS)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text("prompt,other\n" + "".join(f"{p},{i}\n" for i, p in enumerate(PROMPTS)))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    for source in ("p.txt", "folder", "p.jsonl", "p.csv", "p.parquet", "ds"):
        assert load_prompts(tmp_path / source) == PROMPTS, source


def test_prompt_source_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(tmp_path / "p.jsonl")


def write_pairs(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(PROMPTS):
        img = rng.integers(0, 255, size=(40 + 8 * i, 56, 3), dtype=np.uint8)  # any size: resized to the latent grid
        imageio.imwrite(root / f"img{i}.png", img)
        rows.append({"prompt": p, "image": f"img{i}.png"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_image_pairs_resolve_relative_paths(tmp_path):
    pairs = load_pairs(write_pairs(tmp_path))  # image paths relative to the file's folder
    assert pairs.prompts == PROMPTS and pairs.image(1).shape == (48, 56, 3)
    (tmp_path / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="img1.png"):
        load_pairs(tmp_path / "pairs.jsonl")


def test_dmd_reads_a_prompt_file(tmp_path, tiny_t2v_dir, one_thread):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    cfg = load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml",
                            [f"run_dir={tmp_path}/run", f"output_model={tmp_path}/out", f"model.path={tiny_t2v_dir}",
                             "data.source=prompts", f"data.prompt_path={tmp_path}/p.txt", *SMALL])
    trainer = trainer_for(cfg)
    _, _, prompts = trainer.data.get(0, 0, 1, 2, trainer.latent_shape)
    assert set(prompts) <= set(PROMPTS)
    trainer.train()
    assert (tmp_path / "out" / "distill_models" / "distill_model.safetensors").is_file()


def test_i2v_dmd_reads_prompt_image_pairs(tmp_path, tiny_i2v_dir, one_thread):
    pairs = write_pairs(tmp_path)
    cfg = load_train_config(REPO / "configs/train/tiny/i2v_dmd.yaml",
                            [f"run_dir={tmp_path}/run", f"output_model={tmp_path}/out", f"model.path={tiny_i2v_dir}",
                             "data.source=prompts", f"data.prompt_path={pairs}", *SMALL])
    trainer = trainer_for(cfg)
    cond, uncond, _ = trainer.data.get(0, 0, 1, 2, trainer.latent_shape)
    z, f, h, w = trainer.latent_shape
    assert cond.y.shape == (2, 4 + z, f, h, w) and cond.clip_fea.shape[0] == 2
    assert (cond.y == uncond.y).all() and (cond.y[:, :4, 0] == 1).all() and (cond.y[:, :4, 1:] == 0).all()
    trainer.train()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["critic_loss"]) for m in metrics)


def test_i2v_dmd_conditions_on_a_captioned_folder_like_on_a_pairs_file(tmp_path, tiny_i2v_dir, one_thread):
    """The same pairs as a jsonl file and as a folder of images with .txt captions (text from the prompt store
    for the folder): the same prompts, CLIP features and first-frame latents for the same batch."""
    pairs = write_pairs(tmp_path)
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i, row in enumerate(json.loads(line) for line in pairs.read_text().splitlines()):
        (folder / f"{i:03d}.png").write_bytes((tmp_path / row["image"]).read_bytes())
        (folder / f"{i:03d}.txt").write_text(row["prompt"])
    batches = []
    for source, extra in ((pairs, []), (folder, [f"data.text_store={tmp_path}/store"])):
        cfg = load_train_config(REPO / "configs/train/tiny/i2v_dmd.yaml",
                                [f"run_dir={tmp_path}/run", f"model.path={tiny_i2v_dir}", "data.source=prompts",
                                 f"data.prompt_path={source}", *SMALL, *extra])
        trainer = trainer_for(cfg)
        batches.append(trainer.data.get(3, 0, 1, 2, trainer.latent_shape))
    (c1, _, p1), (c2, _, p2) = batches
    assert p1 == p2
    torch.testing.assert_close(c2.y, c1.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c2.clip_fea, c1.clip_fea, rtol=1e-5, atol=1e-5)
    # the store's bf16 text against the in-memory fp32 cache: per-row relative error under 2%
    assert ((c2.context - c1.context).norm(dim=-1) <= 2e-2 * c1.context.norm(dim=-1) + 1e-6).all()
