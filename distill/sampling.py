"""Samples written during training (`logging.sample_*`): the sample pipeline on the training device in the
training dtype, the I2V conditioning images, the files and their CUDA memory peak. A mixin of `distill.trainer.Trainer`
(it reads the trainer's config, device, encoders, logger and run directory)."""

from __future__ import annotations

import copy

from torch import nn

from inference.config import InferConfig
from inference.pipeline import WanPipeline
from inference.ti2v_pipeline import TI2V_MODEL_TYPE, TI2VPipeline


class TrainingSamples:
    """Sampling helpers of the trainer (`write_samples`, `sample_pipeline`, `sample_conditioning_images`)."""

    def write_samples(self, step: int, pipe: WanPipeline) -> None:
        """Generate `logging.sample_prompts` with `pipe`'s config and DiT from fixed seeds, on the training device
        and dtype (`sample_pipeline`), and log the files, in `logging.sample_format` (I2V:
        `sample_conditioning_images`)."""
        from inference.video import save_video

        prompts = self.cfg.logging.sample_prompts
        pipe = self.sample_pipeline(pipe.cfg, pipe.dit)
        image = self.sample_conditioning_images() if pipe.cfg.task == "i2v" else None
        # the training peak so far is carried to the next metrics row; the sampling peak starts here
        self.train_peak_gib = self.cuda_peak("training", self.train_peak_gib).get("training", 0.0)
        for i, video in enumerate(pipe.generate(prompts, image=image)):
            name = f"step{step:07d}_{i}.{self.cfg.logging.sample_format}"
            path = save_video(video, self.run_dir / "samples" / name, fps=8)
            self.logger.video(step, f"sample_{i}", path)
        for key, peak in self.cuda_peak("sampling").items():
            self.logger.event(step, f"{key} peak CUDA memory allocated: {peak:.2f} GiB")

    def sample_pipeline(self, icfg: InferConfig, dit: nn.Module) -> WanPipeline:
        """A pipeline running `dit` on the training device in the training dtype (moved in place: pass a copy),
        with the VAE and the image encoder on that device too (copies when the data keeps them elsewhere)."""
        dit = dit.to(self.device, self.train_dtype).eval()
        vae, image_encoder = self._on_device("vae", self.vae), self._on_device("image_encoder", self.image_encoder)
        pipeline = TI2VPipeline if getattr(dit, "model_type", None) == TI2V_MODEL_TYPE else WanPipeline
        return pipeline(icfg, dit, vae, self.text_encoder, image_encoder, self.device, self.train_dtype)

    def _on_device(self, name: str, module: nn.Module | None) -> nn.Module | None:
        """`module` if it already lives on the training device, else a copy there (made once, then reused)."""
        if module is None:
            return None
        tensors = [*module.parameters(), *module.buffers()]
        if not tensors or all(t.device == self.device for t in tensors):
            return module
        if name not in self.sampling_modules:
            self.sampling_modules[name] = copy.deepcopy(module).to(self.device)
        return self.sampling_modules[name]

    def sample_conditioning_images(self) -> list:
        """One uint8 [H, W, 3] image per sample prompt (I2V), resolved once: `logging.sample_images` when given;
        else the data source's images (the pair whose prompt is the sample prompt, otherwise pair i in order);
        the shapes world's first frame at the sample seed only when the data source is the shapes world."""
        if self.sample_images is None:
            self.sample_images = self._resolve_sample_images()
        return self.sample_images

    def _resolve_sample_images(self) -> list:
        from inference.video import read_image

        cfg = self.cfg
        prompts, given = cfg.logging.sample_prompts, cfg.logging.sample_images
        if given:
            return [read_image(p) for p in given]
        if cfg.data.source == "shapes":
            from distill.data import shapes_world

            world = shapes_world(cfg.data)
            return [world.render(p, cfg.logging.sample_seed)[0] for p in prompts]
        from distill.data import load_pairs

        pairs = load_pairs(cfg.data.prompt_path, cfg.data.prompt_column, cfg.data.image_column)
        where = {p: i for i, p in reversed(list(enumerate(pairs.prompts)))}  # the first pair of each prompt
        chosen = [where.get(p, i % len(pairs)) for i, p in enumerate(prompts)]
        self.logger.event(self.step, f"I2V sample images: pairs {chosen} of {pairs.source} (the pair with the "
                          f"sample prompt, else pair i; set logging.sample_images to choose)")
        return [pairs.image(i) for i in chosen]
