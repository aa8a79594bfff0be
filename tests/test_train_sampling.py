"""Sampling during training (tiny models, CPU, seconds): the sample pipeline runs on the trainer's device in the
training dtype (never a CPU/fp32 default), and I2V samples take their conditioning images from
`logging.sample_images` or from the data source (the shapes world only when the data is the shapes world)."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import distill.sampling as sampling_module
from distill.config import load_train_config
from distill.data import shapes_world
from inference.pipeline import WanPipeline
from inference.video import read_image
from tests.trainer_util import COMPONENTS, REPO, SMALL, dmd_cfg, pretrain_cfg
from train import trainer_for

PROMPT = "a red circle moving left"


class Recorder(WanPipeline):
    """A WanPipeline that records how it was built and what it was asked to generate."""

    built: list[Recorder] = []
    fake_generate = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        Recorder.built.append(self)
        self.images = None

    def generate(self, prompts, seed=None, image=None, **kw):
        self.images = image
        if Recorder.fake_generate:  # a device the CPU cannot compute on (meta): only the construction is checked
            return np.zeros((len(prompts), 5, 32, 32, 3), np.uint8)
        return super().generate(prompts, seed, image, **kw)


@pytest.fixture
def recorder(monkeypatch):
    Recorder.built, Recorder.fake_generate = [], False
    monkeypatch.setattr(sampling_module, "WanPipeline", Recorder)
    return Recorder


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one process-wide state whose mixed precision cannot change: reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _module_where(module) -> set[tuple[str, torch.dtype]]:
    return {(t.device.type, t.dtype) for t in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize("task", ["dmd", "pretrain"])
def test_sample_pipeline_is_built_on_the_training_device_and_dtype(task, tmp_path, one_thread, tiny_t2v_dir,
                                                                   recorder, fresh_accelerator):
    run = tmp_path / "run"
    opts = ["mixed_precision=bf16", "max_steps=1", f"logging.sample_prompts=['{PROMPT}']", "logging.sample_steps=2"]
    cfg = dmd_cfg(run, tiny_t2v_dir, *opts) if task == "dmd" else pretrain_cfg(run, *opts)
    trainer = trainer_for(cfg)
    trainer.sample(1)
    pipe = recorder.built[-1]
    assert pipe.device == trainer.device and pipe.dtype == torch.bfloat16
    assert _module_where(pipe.dit) == {("cpu", torch.bfloat16)}
    assert (run / "samples" / "step0000001_0.mp4").is_file()
    # a training device other than the CPU: the DiT and the VAE go there; the data's own VAE stays where it was
    trainer.device = torch.device("meta")
    recorder.fake_generate = True
    trainer.sample(2)
    pipe = recorder.built[-1]
    assert pipe.device.type == "meta" and pipe.dtype == torch.bfloat16
    assert _module_where(pipe.dit) == {("meta", torch.bfloat16)}
    assert {d for d, _ in _module_where(pipe.vae)} == {"meta"} and pipe.vae is not trainer.vae
    assert {d for d, _ in _module_where(trainer.vae)} == {"cpu"}
    trainer.logger.close()


def test_fp32_training_samples_in_fp32(tmp_path, one_thread, tiny_t2v_dir, recorder):
    cfg = dmd_cfg(tmp_path / "run", tiny_t2v_dir, "max_steps=1", f"logging.sample_prompts=['{PROMPT}']")
    trainer = trainer_for(cfg)
    trainer.sample(1)
    assert recorder.built[-1].dtype == torch.float32
    assert _module_where(recorder.built[-1].dit) == {("cpu", torch.float32)}
    trainer.logger.close()


# ---- I2V sample images -------------------------------------------------------------------------------------
def _pairs(folder, prompts: list[str]):
    """A jsonl of (prompt, image) pairs with distinct random 40x48 PNG images."""
    rng = np.random.default_rng(0)
    lines = []
    for i, p in enumerate(prompts):
        iio.imwrite(folder / f"img{i}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        lines.append(f'{{"prompt": "{p}", "image": "img{i}.png"}}')
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _i2v_cfg(run, teacher, *overrides: str):
    return load_train_config(REPO / "configs/train/tiny/i2v_dmd.yaml",
                             [f"run_dir={run}", f"model.path={teacher}", *SMALL, "dmd.dfake_gen_update_ratio=2",
                              "dmd.ema_start=1", *overrides])


REAL_PROMPTS = ["A cat walks on the grass, realistic style.", "A drone shot of waves crashing against cliffs."]


def test_i2v_prompt_file_data_samples_from_the_data_images(tmp_path, one_thread, tiny_i2v_dir, recorder):
    """A real-size-style I2V config (prompt/image pairs, prompts that are not shapes-world prompts) samples during
    training: sample prompt 0 is pair 2's prompt (its image), prompt 1 is in no pair (pair 1, in order)."""
    pairs = _pairs(tmp_path, ["a sunset over the sea", "a dog", REAL_PROMPTS[0]])
    run = tmp_path / "run"
    cfg = _i2v_cfg(run, tiny_i2v_dir, "data.source=prompts", f"data.prompt_path={pairs}", "max_steps=2",
                   "logging.sample_every=1", f"logging.sample_prompts={REAL_PROMPTS}".replace("'", '"'),
                   "logging.sample_format=npy")  # raw frames: what a machine without ffmpeg writes
    trainer_for(cfg).train()
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        f"step000000{s}_{i}.npy" for s in (1, 2) for i in (0, 1)]
    frames = np.load(run / "samples" / "step0000002_1.npy")
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    images = recorder.built[-1].images
    np.testing.assert_array_equal(images[0], read_image(tmp_path / "img2.png"))
    np.testing.assert_array_equal(images[1], read_image(tmp_path / "img1.png"))
    assert "I2V sample images: pairs [2, 1]" in (run / "events.log").read_text()


def test_i2v_sample_images_given_by_the_user(tmp_path, one_thread, tiny_i2v_dir, recorder):
    _pairs(tmp_path, ["x", "y"])
    run = tmp_path / "run"
    given = [str(tmp_path / "img1.png"), str(tmp_path / "img0.png")]
    cfg = _i2v_cfg(run, tiny_i2v_dir, "max_steps=1", f"logging.sample_prompts=['{PROMPT}', 'a blue square moving up']",
                   f"logging.sample_images={given}")
    trainer = trainer_for(cfg)
    trainer.sample(1)
    for got, path in zip(recorder.built[-1].images, given, strict=True):
        np.testing.assert_array_equal(got, read_image(path))
    trainer.logger.close()


def test_i2v_shapes_data_samples_from_the_world(tmp_path, one_thread, tiny_i2v_dir):
    cfg = _i2v_cfg(tmp_path / "run", tiny_i2v_dir, "max_steps=1", f"logging.sample_prompts=['{PROMPT}']")
    trainer = trainer_for(cfg)
    np.testing.assert_array_equal(trainer.sample_conditioning_images()[0],
                                  shapes_world(cfg.data).render(PROMPT, cfg.logging.sample_seed)[0])
    trainer.logger.close()


def test_bad_sample_images_fail_before_step_0(tmp_path, one_thread, tiny_i2v_dir):
    run = tmp_path / "run"
    cfg = _i2v_cfg(run, tiny_i2v_dir, "max_steps=1", f"logging.sample_prompts=['{PROMPT}']",
                   f"logging.sample_images=['{tmp_path / 'missing.png'}']")
    with pytest.raises(FileNotFoundError, match=r"logging\.sample_images: image not found: .*missing\.png"):
        trainer_for(cfg)  # before any model is built
    assert not (run / "metrics.jsonl").exists()
    (tmp_path / "not_an_image.png").write_text("text")  # exists, unreadable: fails when read, before step 0
    cfg = _i2v_cfg(run, tiny_i2v_dir, "max_steps=1", f"logging.sample_prompts=['{PROMPT}']",
                   f"logging.sample_images=['{tmp_path / 'not_an_image.png'}']")
    trainer = trainer_for(cfg)
    with pytest.raises(ValueError, match="cannot read .*not_an_image.png as an image"):
        trainer.train()
    assert trainer.step == 0 and not list((run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"one image per logging\.sample_prompts entry: got 2 images for 1 prompts"):
        load_train_config(None, [f"model.components_path={COMPONENTS}", f"logging.sample_prompts=['{PROMPT}']",
                                 "logging.sample_images=[a.png,b.png]"])
