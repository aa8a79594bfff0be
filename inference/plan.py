"""Inference memory planner: peak device memory and host RAM per GPU, next to the training planner (distill/plan.py).

    python -m inference.plan --table [--gpu-mem 24]     # {1.3B, 14B, I2V-14B} x {480p, 720p} x {bf16, fp8}
                                                        # x {no offload, block, phase} x {1, 2, 4, 8 GPUs}

Where the numbers come from:
- weights: every tensor of the networks built on the `meta` device (no memory), in the dtype inference runs them
  (DiT bf16, or fp8 codes + fp32 per-row scales for the linears `inference/quantized.py` quantizes; umT5 and CLIP
  bf16; the VAE fp32). Offload keeps on the device what lies outside the blocks plus `UNITS_IN_FLIGHT` units
  (block: one transformer block; phase: the largest of its attention / cross-attention / FFN parts).
- activations: the peak of live tensor bytes while one forward runs, traced op by op with a dispatch mode that
  adds each new storage and subtracts it when its last tensor dies (`LiveBytes`), on the `meta` device at the real
  geometry and token count (a no-grad forward keeps nothing from block to block, so one block shows the peak).
  Attention is a stand-in that allocates only its output, what flash / memory-efficient kernels hold (no
  tokens^2 matrix). The same tracer runs the umT5 encoder (512 tokens) and the VAE decoder (tiled or not).
- several GPUs: sequence parallelism splits the video tokens (and so the activations) over `sp` ranks, CFG
  parallelism puts cond and uncond on different ranks (`cfg` = 2 when the sampler uses CFG and the GPUs allow it),
  every rank holds all weights. Ulysses' all-to-all buffers are one q/k/v-sized tensor, inside the traced peak's
  rounding; not modelled further.
- stages: text encoding, (I2V) image encoding, denoising, VAE decode. Without offload every network stays on the
  device; with offload umT5, CLIP and the VAE visit the device for their stage only (t5/clip/vae_cpu_offload), the
  VAE works in tiles (use_tiling_vae) and the DiT's units are on the device during denoising only (`release()`).
  The peak is the largest stage.
- host RAM per GPU: what rests on the host (offloaded blocks, pinned; umT5, CLIP, VAE); with lazy_load only the
  units in flight of the DiT (`host_lazy`).

`python -m benchmarks.infer_gpu_check` measures the same quantities on a GPU; tests/test_infer_plan.py compares the
tracer with the CPU allocator (profiler timeline) and the offload terms with the offloader's own counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import models.wan_layers as wan_layers
from distill.plan import _encoder_params
from inference.offload import PHASES
from inference.quantized import TARGETS
from models.registry import get_spec
from models.wan_model import WanModel

GB = 1024**3
# Units of the DiT on the device under offload: the one computing, the one being copied in, and on CUDA the one
# just dropped, whose memory the allocator reuses only once the compute stream has passed it (record_stream).
UNITS_IN_FLIGHT = 3
MODELS = {"1.3B": "wan2.1-t2v-1.3b", "14B": "wan2.1-t2v-14b", "I2V-14B": "wan2.1-i2v-14b-480p"}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
FRAMES = 81
OFFLOADS = ("none", "block", "phase")
GPUS = (1, 2, 4, 8)
WEIGHT_DTYPES = ("bf16", "fp8")


# ---- live-bytes tracing ------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak of the bytes of tensor storages created inside the mode and still referenced (each storage once).

    Tensors that exist before the mode (weights) are not counted. A storage leaves when the last tensor object
    that the mode handed out for it is garbage (CPython frees at once; `gc` is not involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0
        self.known: set[int] = set()

    def ignore(self, tensors: Iterator[Tensor]) -> LiveBytes:
        """Storages never to count (weights)."""
        self.known.update(t.untyped_storage()._cdata for t in tensors)
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.known:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, storage.nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.sizes.pop(key)
            del self.refs[key]


def flash_standin(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """What a flash / memory-efficient kernel allocates: its output (the log-sum-exp is O(tokens), dropped)."""
    return torch.empty_like(q)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Swap the DiT's attention for `flash_standin` (the real kernels never hold the tokens x tokens matrix)."""
    orig = wan_layers.attention
    wan_layers.attention = flash_standin
    try:
        yield
    finally:
        wan_layers.attention = orig


def traced_peak(module: nn.Module, make_inputs: Callable[[], tuple[tuple, dict]], method: str = "forward") -> int:
    """Peak live bytes (inputs included, weights excluded) of one no-grad call of `module.<method>`."""
    tracker = LiveBytes().ignore(t for t in [*module.parameters(), *module.buffers()])
    with torch.no_grad(), tracker:
        args, kwargs = make_inputs()
        out = getattr(module, method)(*args, **kwargs)
        del out, args, kwargs
    return tracker.peak


# ---- the DiT -----------------------------------------------------------------------------------------------
def _meta_dit(config: dict, **changes) -> WanModel:
    with torch.device("meta"):
        return WanModel.from_config({**config, **changes})


def weight_bytes(name: str, t: Tensor, dtype: str) -> int:
    """Bytes of one DiT tensor as inference stores it: bf16, or (fp8) 1-byte codes + fp32 row scales."""
    module = name.removesuffix(".weight")
    if dtype == "fp8" and name.endswith(".weight") and TARGETS.match(module) and t.ndim == 2:
        return t.numel() + 4 * t.shape[0]
    return 2 * t.numel()


@dataclass
class DitWeights:
    total: int  # bytes of the whole DiT
    outside: int  # outside the blocks (embeddings, head): stays on the device under offload
    block: int  # one transformer block
    phase: int  # the largest phase of a block


@functools.lru_cache(maxsize=32)
def dit_weights(config_json: str, dtype: str) -> DitWeights:
    """Weight bytes of a DiT config (official config.json fields) in `dtype` ("bf16" | "fp8"), on meta."""
    model = _meta_dit(json.loads(config_json))
    state = model.state_dict()
    sizes = {k: weight_bytes(k, v, dtype) for k, v in state.items()}
    block0 = {k.removeprefix("blocks.0."): v for k, v in sizes.items() if k.startswith("blocks.0.")}
    phases = {"self_attn": 0, **{p: 0 for p, _ in PHASES}}
    for key, size in block0.items():
        phase = next((p for p, prefixes in PHASES if key.startswith(prefixes)), "self_attn")
        phases[phase] += size
    outside = sum(v for k, v in sizes.items() if not k.startswith("blocks."))
    return DitWeights(sum(sizes.values()), outside, sum(block0.values()), max(phases.values()))


@functools.lru_cache(maxsize=256)
def dit_activation_peak(config_json: str, grid: tuple[int, int, int], batch: int, seq_parallel: int = 1,
                        dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak live bytes of one DiT forward (weights in `dtype`) on the latent `grid` (f, h, w) at `batch`, tokens
    split over `seq_parallel` ranks (the rank's share of the frames' rows: f x ceil(h / sp) x w latent pixels)."""
    config = json.loads(config_json)
    f, h, w = grid
    h_rank = -(-h // (2 * seq_parallel)) * 2  # whole patch rows per rank
    model = _meta_dit(config, num_layers=1).to(dtype)
    z, text_dim = config["out_dim"], config.get("text_dim", 4096)
    image = config["model_type"] != "t2v"

    def inputs() -> tuple[tuple, dict]:
        kw = dict(x=torch.empty(batch, z, f, h_rank, w, device="meta"), t=torch.full((batch,), 500.0, device="meta"),
                  context=torch.empty(batch, config["text_len"], text_dim, device="meta"))
        if image:
            kw["clip_fea"] = torch.empty(batch, 257, config.get("clip_dim", 1280), device="meta")
            kw["y"] = torch.empty(batch, config["in_dim"] - z, f, h_rank, w, device="meta")
        return (), kw

    with fused_attention():
        return traced_peak(model, inputs)


# ---- the other stages ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def vae_decode_peak(frames: int, height: int, width: int, tile: int | None = 48, overlap: int = 16) -> int:
    """Peak live bytes of the real-size Wan VAE decoding one video (fp32), tiled (`tile` latent pixels) or not.

    The decoder runs one latent frame at a time with a constant working set; only the decoded frames (and the
    tiles' blending sums) grow with the length, so the peak is affine in the latent frames: traced at 2 and 3
    latent frames and extended (tracing 21 frames op by op takes minutes)."""
    from models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE()
    if tile is not None:
        vae.enable_tiling(tile, overlap)

    def peak(f: int) -> int:
        return traced_peak(vae, lambda: ((torch.empty(1, 16, f, height // 8, width // 8, device="meta"),), {}),
                           "decode")

    f = 1 + (frames - 1) // 4
    if f <= 3:
        return peak(f)
    p2, p3 = peak(2), peak(3)
    return p3 + (f - 3) * (p3 - p2)


@functools.lru_cache(maxsize=32)
def vae_encode_peak(frames: int, height: int, width: int, tile: int | None = 48, overlap: int = 16) -> int:
    """Peak live bytes of Wan's I2V conditioning encode: the real-size VAE (fp32) encoding [image, zeros...] of
    `frames` frames, tiled or not; affine in the 4-frame chunks like the decode, traced at 5 and 9 frames."""
    from models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE()
    if tile is not None:
        vae.enable_tiling(tile, overlap)

    def peak(n: int) -> int:
        return traced_peak(vae, lambda: ((torch.zeros(1, 3, n, height, width, device="meta"),), {}), "encode")

    if frames <= 9:
        return peak(frames)
    p5, p9 = peak(5), peak(9)
    return p9 + ((frames - 9) // 4) * (p9 - p5)


@functools.lru_cache(maxsize=8)
def text_encoder_peak(spec: str, batch: int = 2) -> int:
    """Peak live bytes of umT5 encoding `batch` prompts of text_len tokens (bf16 weights)."""
    from models.t5 import UMT5Encoder

    args = {k: v for k, v in get_spec(spec).text_encoder.items() if k != "type"}
    with torch.device("meta"):
        model = UMT5Encoder(**args).to(torch.bfloat16)
    n = get_spec(spec).dit["text_len"]
    return traced_peak(model, lambda: ((torch.zeros(batch, n, dtype=torch.long, device="meta"),
                                        torch.ones(batch, n, dtype=torch.long, device="meta")), {}))


# ---- the plan -----------------------------------------------------------------------------------------------
@dataclass
class InferPlan:
    model: str
    resolution: str
    dtype: str
    offload: str
    gpus: int
    cfg_parallel: int
    seq_parallel: int
    device: dict[str, float] = field(default_factory=dict)  # GiB per GPU, by item and per stage
    host: float = 0.0  # GiB per GPU, host RAM that rests there
    host_lazy: float = 0.0  # the same with lazy_load

    @property
    def peak(self) -> float:
        return self.device["peak"]


def parallel_split(gpus: int, cfg: bool) -> tuple[int, int]:
    """(cfg_parallel, seq_parallel) for `gpus`: CFG's two branches on two ranks when possible, the rest sequence."""
    cfg_p = 2 if cfg and gpus % 2 == 0 else 1
    return cfg_p, gpus // cfg_p


def estimate(model: str, resolution: str, dtype: str = "bf16", offload: str = "none", gpus: int = 1,
             cfg: bool = False, frames: int = FRAMES) -> InferPlan:
    """Per-GPU plan of one generation (see the module docstring). `cfg`: the teacher's CFG sampler (batch 2)."""
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {list(OFFLOADS)}, got {offload!r}")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {list(WEIGHT_DTYPES)}, got {dtype!r}")
    spec = get_spec(MODELS.get(model, model))
    height, width = RESOLUTIONS[resolution]
    config_json = json.dumps(spec.dit, sort_keys=True)
    w = dit_weights(config_json, dtype)
    text_p, clip_p, vae_p = _encoder_params(spec.name)
    enc = {"text_encoder": 2 * text_p, "image_encoder": 2 * clip_p, "vae": 4 * vae_p}
    cfg_p, sp = parallel_split(gpus, cfg)
    batch = (2 if cfg else 1) // cfg_p
    grid = (1 + (frames - 1) // 4, height // 8, width // 8)
    act = dit_activation_peak(config_json, grid, batch, sp)
    unit = {"block": w.block, "phase": w.phase}.get(offload, 0)
    resident = offload == "none"
    # on the device through every stage: everything (no offload), or the DiT's parts outside the blocks (the units
    # come in during denoising and are released after it)
    base = w.total + sum(enc.values()) if resident else w.outside
    tile = None if resident else 48
    visit = lambda *names: 0 if resident else sum(enc[n] for n in names)  # noqa: E731  offloaded weights
    stage_extra = {"text encoding": text_encoder_peak(spec.name) + visit("text_encoder")}
    if spec.image_encoder is not None:
        stage_extra["image encoding"] = vae_encode_peak(frames, height, width, tile) + visit("image_encoder", "vae")
    stage_extra["denoising"] = act + (0 if resident else UNITS_IN_FLIGHT * unit)
    stage_extra["VAE decode"] = vae_decode_peak(frames, height, width, tile) + visit("vae")
    dit_resident = w.total if resident else w.outside + UNITS_IN_FLIGHT * unit
    dev = {"DiT weights on device": dit_resident / GB, "DiT activations (peak)": act / GB,
           "encoders resident": (sum(enc.values()) if resident else 0) / GB}
    dev.update({f"stage: {k}": (base + v) / GB for k, v in stage_extra.items()})
    dev["peak"] = max(v for k, v in dev.items() if k.startswith("stage: "))
    resting = 0 if resident else sum(enc.values())
    host = (resting + (0 if resident else w.total - w.outside)) / GB
    host_lazy = (resting + (0 if resident else 2 * unit)) / GB  # units being staged (pinned)
    return InferPlan(model, resolution, dtype, offload, gpus, cfg_p, sp, dev, host, host_lazy)


def table(gpu_mem: float | None = None, cfg: bool = False) -> str:
    """Markdown table over models x resolutions x dtypes x offload x GPUs (81 frames), GiB per GPU."""
    head = ("| model | res | weights | offload | GPUs (cfg x sp) | DiT weights on GPU | DiT act. | denoising stage |"
            " peak / GPU | host RAM / GPU | host, lazy_load |" + (f" fits {gpu_mem:g} GiB |" if gpu_mem else ""))
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for model in MODELS:
        for res in RESOLUTIONS:
            for dtype in WEIGHT_DTYPES:
                for off in OFFLOADS:
                    for gpus in GPUS:
                        p = estimate(model, res, dtype, off, gpus, cfg)
                        d = p.device
                        fits = (" yes |" if p.peak <= gpu_mem else " no |") if gpu_mem else ""
                        rows.append(f"| {model} | {res} | {dtype} | {off} | {gpus} ({p.cfg_parallel}x{p.seq_parallel})"
                                    f" | {d['DiT weights on device']:.1f} | {d['DiT activations (peak)']:.2f} | "
                                    f"{d['stage: denoising']:.1f} | {p.peak:.1f} | {p.host:.1f} | "
                                    f"{p.host_lazy:.1f} |{fits}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="store_true", help="the table over every model, size, dtype, offload, GPUs")
    ap.add_argument("--cfg", action="store_true", help="plan the CFG teacher (batch 2) instead of the 4-step student")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU: adds a 'fits' column")
    ap.add_argument("--model", choices=list(MODELS), default="14B")
    ap.add_argument("--resolution", choices=list(RESOLUTIONS), default="480p")
    ap.add_argument("--dtype", choices=WEIGHT_DTYPES, default="bf16")
    ap.add_argument("--offload", choices=OFFLOADS, default="none")
    ap.add_argument("--gpus", type=int, default=1)
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.gpu_mem, args.cfg))
        return
    p = estimate(args.model, args.resolution, args.dtype, args.offload, args.gpus, args.cfg)
    print(f"{p.model} {p.resolution} {p.dtype} offload={p.offload} on {p.gpus} GPU(s) "
          f"(cfg x sp = {p.cfg_parallel} x {p.seq_parallel}):")
    for k, v in p.device.items():
        print(f"  {k:<34s}{v:8.2f} GiB")
    print(f"  {'host RAM per GPU':<34s}{p.host:8.2f} GiB (lazy_load: {p.host_lazy:.2f})")


if __name__ == "__main__":
    main()
