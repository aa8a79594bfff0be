"""A Gradio web UI for the T2V / I2V pipeline: the model is loaded once, every click generates one video.

    python -m inference.webui --config configs/infer/tiny/t2v_distill_4step.json            # http://127.0.0.1:7860
    python -m inference.webui --config configs/infer/tiny/i2v_distill_4step.json --port 7861   # shows an image upload
    python -m inference.webui --config configs/infer/tiny/t2v_teacher.json --lora_dir checkpoints/ --host 0.0.0.0
    python -m inference.webui --config configs/infer/wan/wan_t2v.json --model_path /data/Wan2.1-T2V-1.3B

Structure: `run_generation` is a plain function (validate the inputs -> switch the UI's runtime LoRA -> generate ->
write the mp4) that tests call without a browser; `build_ui` wires it to Gradio components (defaults from the
config, a progress bar fed by the sampler's per-step callback, input errors shown as `gr.Error` with the rule);
`main` parses the flags, loads the pipeline and serves the page.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.config import InferConfig, add_model_args, check_video_size, load_config
from inference.video import save_video

if TYPE_CHECKING:  # gradio takes ~2.5 s to import: only build_ui / main pay for it
    import gradio as gr

    from inference.pipeline import WanPipeline

log = logging.getLogger(__name__)

# The UI's own runtime LoRA is attached under this prefix (+ its path), so it never collides with the config's
# lora_configs (merged at load, or attached under their file stems with lora_mode "runtime").
UI_LORA_PREFIX = "webui:"
LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# One pipeline per process; its timings and runtime LoRAs are per-call state, so generations run one at a time.
_PIPE_LOCK = threading.Lock()


class InputError(ValueError):
    """Bad user input (frame count, size, missing image, LoRA path, ...): shown to the user, never a crash."""


@dataclass
class GenerationResult:
    """One generated video: its mp4, the frames uint8 [F, H, W, 3] and what it cost."""

    video: Path
    frames: np.ndarray
    seed: int
    seconds: float  # wall time of the whole call (LoRA switch + generate + mp4)
    stages: dict[str, float]  # pipe.timings.stages: text_encoder, image_encoder, dit, vae_decode
    nfe: int  # DiT evaluations (CFG counts two per step)
    steps: int
    lora: str | None = None  # "path @ strength" of the UI LoRA, if any
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Markdown shown under the video."""
        f, h, w = self.frames.shape[:3]
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items())
        lines = [f"**{f} frames, {w}x{h}, in {self.seconds:.2f} s** ({stages})",
                 f"DiT evaluations (NFE): {self.nfe} over {self.steps} steps; seed {self.seed}",
                 f"LoRA: {self.lora or 'none'}"]
        return "  \n".join(lines)


# ---- input checks -------------------------------------------------------------------------------------------------
def _integer(name: str, value: float | None, default: int) -> int:
    """A whole number from a UI field (Gradio numbers may arrive as floats); None means the config's default."""
    if value is None:
        return default
    if float(value) != int(value):
        raise InputError(f"{name} must be a whole number, got {value}")
    return int(value)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """An uploaded image as uint8 [H, W, 3] (grey is repeated, alpha dropped)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise InputError(f"the image must be an RGB picture, got an array of shape {img.shape}")
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def resolve_ui_lora(path: str | Path, lora_dir: str | Path | None = None) -> Path:
    """A LoRA path typed in the UI: absolute, relative to --lora_dir, or (like model_path) to the cwd / repo root."""
    from inference.lora import resolve_lora_path

    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [*([Path(lora_dir) / p] if lora_dir else []), resolve_lora_path(p)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise InputError(f"LoRA file not found: {path} (looked at {looked}); expected a {'/'.join(LORA_SUFFIXES)} file")


def list_loras(lora_dir: str | Path | None) -> list[str]:
    """LoRA files under --lora_dir (recursively), relative to it, sorted: the dropdown's choices."""
    if not lora_dir:
        return []
    root = Path(lora_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file())


def set_ui_lora(dit, path: Path | None, strength: float) -> str | None:
    """Make `path` at `strength` the UI's one runtime LoRA on `dit` (None: none), without reloading the model.

    Same file: only its strength changes. Another file: the new one is attached first (its keys and shapes are
    checked against the model; a bad file raises and leaves the previous LoRA in place), then the old one removed.
    Returns "path @ strength" or None.
    """
    from inference.lora import LoraCoverageWarning, LoraError, runtime_loras

    rt = runtime_loras(dit)
    current = [n for n in rt.names if n.startswith(UI_LORA_PREFIX)]
    wanted = None if path is None else UI_LORA_PREFIX + str(path)
    if wanted is not None and wanted in current:
        rt.set_strength(wanted, strength)
    elif wanted is not None:
        try:
            with warnings.catch_warnings():  # a LoRA touching only attention layers is normal
                warnings.simplefilter("ignore", LoraCoverageWarning)
                rt.add(path, strength, name=wanted)
        except LoraError as e:  # keys or shapes that do not fit this model: the message says which model it fits
            raise InputError(f"cannot use LoRA {path}: {e}") from e
        except Exception as e:  # not a tensor file (safetensors / torch raise many types): still the user's file
            raise InputError(f"cannot use LoRA {path}: cannot read it as a LoRA ({type(e).__name__}: {e})") from e
    for name in current:
        if name != wanted:
            rt.remove(name)
    return None if path is None else f"{path.name} @ {strength:g}"


def generation_overrides(cfg: InferConfig, height: float | None, width: float | None, frames: float | None,
                         steps: float | None, shift: float | None, cfg_scale: float | None) -> dict:
    """InferConfig overrides for one call, checked with messages that state the rule. None keeps the config value.

    cfg_scale 1 switches CFG off (one DiT pass per step); a distilled model's step count is its denoising_step_list.
    """
    frames_ = _integer("frames", frames, cfg.target_video_length)
    height_ = _integer("height", height, cfg.target_height)
    width_ = _integer("width", width, cfg.target_width)
    try:
        check_video_size(frames_, height_, width_)
    except ValueError as e:
        raise InputError(str(e).replace("target_video_length", "frames").replace("target_", "")) from e
    out: dict = dict(target_video_length=frames_, target_height=height_, target_width=width_)
    steps_ = _integer("steps", steps, cfg.infer_steps)
    if cfg.is_distill and steps_ != len(cfg.denoising_step_list):
        raise InputError(f"this distilled model runs exactly {len(cfg.denoising_step_list)} steps "
                         f"(denoising_step_list {cfg.denoising_step_list}), got steps={steps_}")
    if steps_ < 1:
        raise InputError(f"steps must be >= 1, got {steps_}")
    out["infer_steps"] = steps_
    if shift is not None and cfg.is_distill and float(shift) != cfg.sample_shift:
        raise InputError(f"this distilled model samples at its training schedule ({cfg.schedule().describe()}): "
                         f"the shift cannot change, got {shift}")
    if shift is not None and not cfg.is_distill:
        if shift <= 0:
            raise InputError(f"shift must be > 0, got {shift}")
        out["sample_shift"] = float(shift)
    if cfg_scale is not None and isinstance(cfg.sample_guide_scale, list) and cfg_scale == default_cfg_scale(cfg):
        cfg_scale = None  # Wan2.2 MoE: the field shows the high-noise scale; left as is, the [high, low] pair stays
    if cfg_scale is not None:
        if cfg_scale < 0:
            raise InputError(f"CFG scale must be >= 0 (1 = off), got {cfg_scale}")
        out.update(enable_cfg=cfg_scale != 1, sample_guide_scale=float(cfg_scale))
    return out


# ---- generation ---------------------------------------------------------------------------------------------------
def run_generation(pipe: WanPipeline, prompt: str, *, negative_prompt: str | None = None,
                   image: np.ndarray | None = None, height: float | None = None, width: float | None = None,
                   frames: float | None = None, seed: float | None = None, steps: float | None = None,
                   shift: float | None = None, cfg_scale: float | None = None, lora_path: str | None = None,
                   lora_strength: float = 1.0, lora_dir: str | Path | None = None,
                   output_dir: str | Path = "outputs/webui", fps: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Generate one video and write it as mp4 under `output_dir`. Every input is checked first; bad input raises
    `InputError` with the rule. None (an emptied field) keeps the config's value.

    image: uint8 [H, W, 3] (used only by an I2V model, where it is required). seed < 0 draws a random seed.
    lora_path: the UI's runtime LoRA ("" / None: none), switched or re-weighted between calls without reloading.
    progress(i, n) runs after each of the n denoising steps. fps: of the mp4 (default: the config's).
    """
    t0 = time.perf_counter()
    cfg = pipe.cfg
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty: describe the video, e.g. 'a red circle moving left'")
    overrides = generation_overrides(cfg, height, width, frames, steps, shift, cfg_scale)
    seed_ = _integer("seed", seed, cfg.seed)
    if seed_ < 0:
        seed_ = int(np.random.default_rng().integers(0, 2**31))
    if seed_ >= 2**63:
        raise InputError(f"seed must be below 2**63, got {seed_}")
    ti2v = takes_both_tasks(pipe)
    if cfg.task == "i2v" and image is None and not ti2v:
        raise InputError("this is an image-to-video (I2V) model: upload a start image")
    # a T2V model ignores an uploaded image; Wan2.2 TI2V-5B runs I2V with one and T2V without
    rgb = _as_rgb(image) if image is not None and (cfg.task == "i2v" or ti2v) else None
    if ti2v:
        overrides["task"] = "t2v" if rgb is None else "i2v"
    lora = resolve_ui_lora(lora_path, lora_dir) if lora_path and str(lora_path).strip() else None

    # The lock first: catch_warnings swaps process-wide state, safe only while one generation runs.
    with _PIPE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg.replace(**overrides)  # validate the combination (e.g. CFG on a distilled model warns)
        except ValueError as e:
            raise InputError(str(e)) from e
        # on a torchrun group the other ranks repeat this LoRA choice and call (inference/parallel.py)
        from inference.parallel import announce

        announce(pipe, {"prompt": prompt.strip(), "seed": seed_, "image": rgb, "negative_prompt": negative_prompt,
                        "overrides": overrides, "lora": lora, "lora_strength": float(lora_strength)})
        lora_desc = set_ui_lora(pipe.dit, lora, float(lora_strength))
        video = pipe.generate(prompt.strip(), seed=seed_, image=rgb, callback=progress,
                              negative_prompt=negative_prompt, **overrides)
        stages, nfe = dict(pipe.timings.stages), pipe.timings.nfe
    path = save_video(video[0], Path(output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.mp4",
                      fps=fps or cfg.fps)
    return GenerationResult(video=path, frames=video[0], seed=seed_, seconds=time.perf_counter() - t0,
                            stages=stages, nfe=nfe, steps=overrides["infer_steps"], lora=lora_desc,
                            warnings=sorted({str(w.message) for w in caught}))


# ---- the page -----------------------------------------------------------------------------------------------------
def takes_both_tasks(pipe) -> bool:
    """Wan2.2 TI2V-5B (`TI2VPipeline`): one model for T2V and I2V, the start image (or none) decides per call."""
    from inference.ti2v_pipeline import TI2V_MODEL_TYPE

    return getattr(pipe.dit, "model_type", None) == TI2V_MODEL_TYPE


def default_cfg_scale(cfg: InferConfig) -> float:
    """The CFG field's default: the config's guide scale when it enables CFG, else 1 (off; distilled models)."""
    return cfg.guide_scales()[0] if cfg.enable_cfg else 1.0  # Wan2.2 MoE [high, low]: the high-noise scale


def build_ui(pipe: WanPipeline, cfg: InferConfig, lora_dir: str | Path | None = None,
             output_dir: str | Path = "outputs/webui") -> gr.Blocks:
    """The page: inputs with the config's defaults, a Generate button, the video, its timings and NFE."""
    import gradio as gr

    distill = cfg.is_distill
    task = "TI2V" if takes_both_tasks(pipe) else cfg.task.upper()
    kind = f"{task}, {'distilled ' + str(len(cfg.denoising_step_list)) + '-step' if distill else 'teacher'}"

    def on_generate(prompt, negative_prompt, image, height, width, frames, seed, steps, shift, cfg_scale,
                    lora_path, lora_strength, progress=gr.Progress()):  # noqa: B008 (Gradio's injection idiom)
        progress(0, desc="encoding")
        try:
            res = run_generation(pipe, prompt, negative_prompt=negative_prompt, image=image, height=height,
                                 width=width, frames=frames, seed=seed, steps=steps, shift=shift,
                                 cfg_scale=cfg_scale, lora_path=lora_path, lora_strength=lora_strength,
                                 lora_dir=lora_dir, output_dir=output_dir,
                                 progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"))
        except InputError as e:
            raise gr.Error(str(e), title="Invalid input", print_exception=False) from e
        except Exception as e:  # the server must keep serving: report, log the traceback
            log.exception("generation failed")
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}", title="Error") from e
        for w in res.warnings:
            gr.Warning(w)
        return str(res.video), res.summary()

    with gr.Blocks(title="stepdistill", analytics_enabled=False) as demo:
        gr.Markdown(f"## stepdistill video generator\n{kind} model, {cfg.model_cls}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle moving left", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value=cfg.sample_neg_prompt, lines=1,
                                      info="used only when CFG is on (scale != 1)", elem_id="negative")
                both = takes_both_tasks(pipe)
                image = gr.Image(label="Start image (optional: I2V with one, T2V without)" if both else
                                 "Start image (I2V)", type="numpy", image_mode="RGB",
                                 visible=cfg.task == "i2v" or both, elem_id="image")
                with gr.Row():
                    height = gr.Number(cfg.target_height, label="Height", precision=0, info="multiple of 16",
                                       elem_id="height")
                    width = gr.Number(cfg.target_width, label="Width", precision=0, info="multiple of 16",
                                      elem_id="width")
                    frames = gr.Number(cfg.target_video_length, label="Frames", precision=0, info="1 + 4k",
                                       elem_id="frames")
                with gr.Row():
                    seed = gr.Number(cfg.seed, label="Seed", precision=0, info="-1: random", elem_id="seed")
                    steps = gr.Number(cfg.infer_steps, label="Steps", precision=0, interactive=not distill,
                                      info="fixed by denoising_step_list" if distill else "denoising steps",
                                      elem_id="steps")
                with gr.Row():
                    shift = gr.Number(cfg.sample_shift, label="Shift", interactive=not distill, elem_id="shift",
                                      info="fixed by the student's schedule" if distill else "timestep shift, > 0")
                    cfg_scale = gr.Number(default_cfg_scale(cfg), label="CFG scale", info="1 = off",
                                          elem_id="cfg_scale")
                with gr.Accordion("LoRA (runtime, switchable without reloading)", open=False):
                    lora_path = gr.Dropdown([("none", ""), *[(p, p) for p in list_loras(lora_dir)]], value="",
                                            allow_custom_value=True, label="LoRA file",
                                            info="a file of --lora_dir, or type a path", elem_id="lora_path")
                    lora_strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA strength",
                                              elem_id="lora_strength")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Result", autoplay=True, loop=True, interactive=False, elem_id="video")
                info = gr.Markdown(elem_id="info")
        inputs = [prompt, negative, image, height, width, frames, seed, steps, shift, cfg_scale, lora_path,
                  lora_strength]
        # One queue for both triggers: the model serves one generation at a time, the others wait their turn.
        for trigger in (run.click, prompt.submit):
            trigger(on_generate, inputs, [video, info], concurrency_limit=1, concurrency_id="generate")
    return demo


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)  # --config / --config_json, --model_path, --model_cls (as infer.py and the server)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--lora_dir", help="folder whose LoRA files the UI offers (relative LoRA paths resolve here)")
    p.add_argument("--output_dir", default="outputs/webui", help="where the generated mp4 files are written")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one line each
    try:
        cfg = load_config(args.config, model_cls=args.model_cls)
        if args.lora_dir and not Path(args.lora_dir).is_dir():
            raise FileNotFoundError(f"--lora_dir is not a folder: {args.lora_dir}")
        from inference.loader import check_before_loading
        from inference.parallel import announce, follow_webui, is_main, load_pipeline_launched

        check_before_loading(cfg, args.model_path)  # weight files: truncation, a distill schedule on base weights
        t0 = time.perf_counter()
        pipe = load_pipeline_launched(cfg, args.model_path)  # under torchrun: on the config's parallel group
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_main(pipe):  # torchrun rank > 0: repeat rank 0's generations until the page closes
        follow_webui(pipe)
        return 0
    print(f"loaded {cfg.task} model ({cfg.model_cls}) in {time.perf_counter() - t0:.2f}s", flush=True)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    demo = build_ui(pipe, pipe.cfg, lora_dir=args.lora_dir, output_dir=output_dir)
    # ssr_mode off: server-side rendering needs Node; allowed_paths: Gradio serves only files it was allowed to.
    try:
        demo.queue().launch(server_name=args.host, server_port=args.port, allowed_paths=[str(output_dir)],
                            ssr_mode=False, show_error=True)
    finally:
        announce(pipe, None)  # a torchrun group's follower ranks stop with the page
    return 0


if __name__ == "__main__":
    sys.exit(main())
