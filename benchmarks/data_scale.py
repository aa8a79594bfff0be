"""Data at scale: the prompt store and the trainer's memory with long prompt lists; I2V conditioning cost.

    python -m benchmarks.data_scale --out benchmarks/results/data_scale        # ~5 minutes on one CPU thread

1. Encode `--prompts` (100,000) synthetic prompts with the tiny umT5 (`python -m distill.encode_prompts` code
   path): prompts/s and bytes per prompt in the store.
2. Trainer RSS (a tiny DMD trainer reading the store, each case in a fresh process) after building (step 0) and
   after `--steps` (100) DMD iterations, with 1,000 and with `--prompts` prompts: the difference must stay under
   200 MB (rows are read from disk per batch; only 12 bytes of index per prompt are held).
3. Planned real figures from FLOPs counted on the meta device: umT5-XXL in bf16 (bytes per prompt, prompts/s
   per GPU at `--tflops` sustained), and for I2V the CLIP + Wan-VAE encode of one conditioning frame against the
   DiT work of one DMD micro-batch, and the bytes per sample if those were stored instead (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2)
TRAIN = ["data.num_frames=5", "data.height=32", "data.width=32", "batch_size=1", "num_threads=1",
         "logging.sample_prompts=[]", "dmd.dfake_gen_update_ratio=5", "distill.negative_prompt=blurry"]
WORDS = ("a red blue green small large old young cat dog car bird river city street forest ocean slowly quickly "
         "walks runs flies drives under over near through the at night in rain sunlight camera pans zooms").split()
LIMIT_MB = 200.0


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of 8-16 words (about 60 bytes: 60 tokens of the tiny byte tokenizer)."""
    rng = np.random.default_rng(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS, size=rng.integers(8, 17))) for i in range(n)]


def rss_mb() -> dict[str, float]:
    """Resident memory of this process (MB): total, anonymous, file-backed (mapped files: libraries, ...)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def train_config(folder: Path, prompts_file: Path, store: Path, run: Path):
    from distill.config import load_train_config

    return load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml",
                             [f"model.path={folder}", "data.source=prompts", f"data.prompt_path={prompts_file}",
                              f"data.text_store={store}", f"run_dir={run}", *TRAIN])


def encode(folder: Path, prompts_file: Path, store: Path, run: Path) -> dict:
    """Build the store for a prompt file (one process); prompts/s and bytes per prompt."""
    from distill.encode_prompts import ensure_store, store_prompts, text_len_of

    cfg = train_config(folder, prompts_file, store, run)
    prompts = store_prompts(cfg)
    t0 = time.perf_counter()
    s = ensure_store(cfg, prompts, text_len_of(cfg), torch.device("cpu"), log=lambda m: None)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in store.glob("chunk_*.safetensors"))
    return {"prompts": len(prompts), "seconds": seconds, "prompts_per_s": len(prompts) / seconds,
            "bytes_per_prompt": size / len(prompts), "mean_tokens": float(s.lengths.mean()), "dim": s.dim,
            "store_bytes": size}


def rss_child(folder: Path, prompts_file: Path, store: Path, run: Path, steps: int) -> dict:
    """In a fresh process: RSS after building a DMD trainer on the store, and after `steps` iterations."""
    from train import trainer_for

    torch.set_num_threads(1)
    trainer = trainer_for(train_config(folder, prompts_file, store, run))
    at0 = rss_mb()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.train_step(step)
    return {"step0": at0, f"step{steps}": rss_mb(), "s_per_step": (time.perf_counter() - t0) / steps,
            "prompts": len(trainer.data.prompts)}


def run_rss(folder: Path, prompts_file: Path, store: Path, run: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data_scale", "--rss-child", str(folder), str(prompts_file), str(store),
           str(run), str(steps)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- planned real figures ----------------------------------------------------------------------------------------
def meta_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def real_text(tokens: int, tflops: float) -> dict:
    """umT5-XXL (bf16) per prompt of `tokens` tokens: FLOPs, store bytes, prompts/s per GPU at `tflops`."""
    from models.registry import get_spec
    from models.t5 import UMT5Encoder

    cfg = {k: v for k, v in get_spec("wan2.1-t2v-14b").text_encoder.items() if k != "type"}
    with torch.device("meta"):
        model = UMT5Encoder(**cfg)
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    flops = meta_flops(lambda: model(ids, torch.ones_like(ids)))
    return {"tokens": tokens, "tflop_per_prompt": flops / 1e12, "bytes_per_prompt": tokens * cfg["dim"] * 2 + 12,
            "prompts_per_s_per_gpu": tflops * 1e12 / flops, "assumed_tflops": tflops}


def real_i2v(tflops: float) -> dict:
    """I2V-14B-480P: CLIP + Wan-VAE encode of one conditioning frame (81x480x832) against one DMD micro-batch of
    DiT work (distill/plan.py flops), and the bytes per sample if they were stored (bf16)."""
    from distill.config import load_train_config
    from distill.plan import count_params, dit_config, flops, latent_grid
    from models.clip import CLIPImageEncoder
    from models.registry import get_spec
    from models.vae import WanVAE

    spec = get_spec("wan2.1-i2v-14b-480p")
    args = lambda d: {k: v for k, v in d.items() if k != "type"}  # noqa: E731
    with torch.device("meta"):
        clip, vae = CLIPImageEncoder(**args(spec.image_encoder)), WanVAE(**args(spec.vae))
    image = torch.zeros(1, 3, 480, 832, device="meta")
    encode = meta_flops(lambda: clip.encode(image)) + meta_flops(
        lambda: vae.encode(torch.zeros(1, 3, 81, 480, 832, device="meta")))
    cfg = load_train_config(REPO / "configs/train/wan/i2v_14b_480p_dmd.yaml")
    config = dit_config(cfg)
    _, n_linear, _, _ = count_params(config)
    f, h, w = latent_grid(cfg)
    micro = flops(cfg, config, n_linear, f * (h // 2) * (w // 2)) / cfg.grad_accum
    # per micro-batch the trainer conditions each phase it runs: the critic every iteration, the generator every
    # dfake_gen_update_ratio iterations
    per_iter = 1 + 1 / cfg.dmd.dfake_gen_update_ratio
    stored = (16 * f * h * w + 257 * spec.image_encoder["dim"]) * 2
    return {"encode_tflop_per_sample": encode / 1e12, "dit_tflop_per_micro_batch": micro / 1e12,
            "encode_share": per_iter * encode / micro, "encode_s_per_sample": encode / (tflops * 1e12),
            "stored_bytes_per_sample": stored, "stored_gb_per_40k": 40_000 * stored / 1e9}


def tiny_i2v_condition_seconds(repeats: int = 20) -> float:
    """Seconds per micro-batch (1 sample, 9x48x48) of the tiny CLIP + codec conditioning on this CPU."""
    from inference.pipeline import image_condition
    from models.components import TINY_COMPONENTS, load_encoders

    vae, _, clip = load_encoders(TINY_COMPONENTS, "i2v", 64)
    image = torch.rand(1, 3, 48, 48) * 2 - 1
    shape = vae.latent_shape(9, 48, 48)
    image_condition(vae, clip, image, shape)
    t0 = time.perf_counter()
    for _ in range(repeats):
        image_condition(vae, clip, image, shape)
    return (time.perf_counter() - t0) / repeats


# ---- report ------------------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    e, small, big = r["encode"], r["rss"]["small"], r["rss"]["large"]
    steps = r["steps"]
    rows = [f"# Data at scale (`python -m benchmarks.data_scale`, {r['cpu_threads']} CPU thread(s))", "",
            f"Prompt store, tiny umT5 (dim {e['dim']}, byte tokenizer), {e['prompts']:,} prompts: "
            f"{e['prompts_per_s']:.0f} prompts/s, {e['bytes_per_prompt']:.0f} bytes per prompt "
            f"({e['mean_tokens']:.1f} tokens x {e['dim']} x bf16 + offsets), {e['store_bytes'] / 1e6:.0f} MB.", "",
            f"| trainer RSS (MB) | step 0 | step {steps} | of which file-backed at step {steps} |",
            "|---|---|---|---|"]
    for case in (small, big):
        rows.append(f"| {case['prompts']:,} prompts | {case['step0']['VmRSS']:.0f} | "
                    f"{case[f'step{steps}']['VmRSS']:.0f} | {case[f'step{steps}']['RssFile']:.0f} |")
    d0, d1 = r["rss"]["difference_step0_mb"], r["rss"][f"difference_step{steps}_mb"]
    rows += ["", f"Difference {big['prompts']:,} vs {small['prompts']:,} prompts: {d0:+.0f} MB at step 0, "
                 f"{d1:+.0f} MB at step {steps} (limit {LIMIT_MB:.0f} MB: {'ok' if r['rss']['ok'] else 'EXCEEDED'}).",
             "", "Planned real figures (FLOPs counted on the meta device; throughput assumed, not measured):", ""]
    t = r["real_text"]
    rows.append(f"- umT5-XXL, bf16, {t['tokens']} tokens per prompt: {t['tflop_per_prompt']:.2f} TFLOP and "
                f"{t['bytes_per_prompt'] / 1e6:.2f} MB per prompt in the store; at {t['assumed_tflops']:.0f} "
                f"TFLOP/s sustained: {t['prompts_per_s_per_gpu']:.0f} prompts/s per GPU (40k prompts on 8 GPUs: "
                f"{40_000 / 8 / t['prompts_per_s_per_gpu']:.0f} s; store "
                f"{40_000 * t['bytes_per_prompt'] / 1e9:.0f} GB).")
    i = r["real_i2v"]
    rows.append(f"- I2V-14B-480P conditioning (CLIP + Wan-VAE encode of [image, 80 zero frames]): "
                f"{i['encode_tflop_per_sample']:.0f} TFLOP per sample ({i['encode_s_per_sample']:.2f} s at the same "
                f"rate) against {i['dit_tflop_per_micro_batch']:.0f} TFLOP of DiT work per DMD micro-batch: "
                f"{100 * i['encode_share']:.1f}% extra compute when computed on the device per batch; stored "
                f"instead: {i['stored_bytes_per_sample'] / 1e6:.2f} MB per sample "
                f"({i['stored_gb_per_40k']:.0f} GB for 40k pairs).")
    rows.append(f"- Tiny I2V conditioning on this CPU: {1000 * r['tiny_i2v_condition_s']:.1f} ms per micro-batch "
                f"(tiny DMD iteration here: {1000 * big['s_per_step']:.0f} ms).")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/data_scale", help="writes <out>.json and <out>.md")
    p.add_argument("--prompts", type=int, default=100_000)
    p.add_argument("--small", type=int, default=1_000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--real-tokens", type=int, default=128, help="mean umT5 tokens of a real prompt (assumed)")
    p.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU (assumed)")
    p.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rss_child:
        folder, prompts_file, store, run, steps = a.rss_child
        print(json.dumps(rss_child(Path(folder), Path(prompts_file), Path(store), Path(run), int(steps))))
        return 0
    from models.components import make_tiny_model

    torch.set_num_threads(1)  # on a shared 2-core machine one thread is 3x faster than two for the tiny encoder
    result: dict = {"cpu_threads": torch.get_num_threads(), "steps": a.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_tiny_model(tmp / "model", "tiny-t2v", seed=0, **SMALL_DIT)
        cases = {}
        for name, n in (("small", a.small), ("large", a.prompts)):
            (tmp / f"{name}.txt").write_text("\n".join(synthetic_prompts(n)) + "\n")
            stats = encode(folder, tmp / f"{name}.txt", tmp / f"store_{name}", tmp / f"run_{name}")
            if name == "large":
                result["encode"] = stats
            cases[name] = run_rss(folder, tmp / f"{name}.txt", tmp / f"store_{name}", tmp / f"run_{name}", a.steps)
    diff = {k: cases["large"][k]["VmRSS"] - cases["small"][k]["VmRSS"] for k in ("step0", f"step{a.steps}")}
    result["rss"] = {**cases, "difference_step0_mb": diff["step0"], f"difference_step{a.steps}_mb":
                     diff[f"step{a.steps}"], "ok": max(diff.values()) < LIMIT_MB}
    result["real_text"] = real_text(a.real_tokens, a.tflops)
    result["real_i2v"] = real_i2v(a.tflops)
    result["tiny_i2v_condition_s"] = tiny_i2v_condition_seconds()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["rss"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
