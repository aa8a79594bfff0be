"""Memory and compute planner for training configs: per-GPU memory by item, the peak, FLOPs per iteration.

    python train.py --config configs/train/wan/t2v_14b_dmd.yaml --dry-run --plan-gpus 8 --plan-gpu-mem 80 \
        [--plan-engine fsdp] [--plan-offload]
    python -m distill.plan --table [--gpu-mem 80]        # minimum GPUs for the Wan2.1 configs, every engine

Model states, per GPU (P processes; `shard` = P for fsdp/zero3, min(P, gpus_per_node) for hybrid; zero2 shards
gradients, optimizer states and the EMA but keeps full parameters):
- trainable parameters in fp32 (generator and critic; LoRA mode: their adapters), the frozen teacher in its
  `dmd.real_score_dtype` (LoRA mode: the ONE base that all three networks share);
- gradients (fp32) of one trainable network at a time (the generator's are freed before the critic step);
- AdamW states (2 x fp32) of both trainable networks, the EMA (fp32) of the generator;
- `--plan-offload`: all of the above in CPU memory (FSDP `CPUOffload(offload_params=True)` / ZeRO-3 with
  offload_param + offload_optimizer), reported separately; the GPU holds the gathered blocks and activations;
- gathered bf16 weights: sharded engines all-gather one block at a time (two with prefetch); DDP/zero2 with
  bf16 autocast keep the bf16 casts of the trained network's linear weights for its backward.
Activations come from tracing what autograd saves: one DiT block is run on the meta device (no memory, any
size) with a `saved_tensors_hooks` counter and a fused-attention stand-in (flash/memory-efficient attention
keep q, k, v, out and the log-sum-exp, O(tokens)); per-block-checkpointed runs keep each block's input and
recompute one block at a time. Validated against measured peaks by `python -m benchmarks.memory`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import models.wan_layers as wan_layers
from distill.config import TrainConfig, load_train_config
from models.registry import get_spec
from models.wan_model import WanModel

GB = 1024**3
ENGINES = ("ddp", "zero2", "fsdp", "zero3", "hybrid")
GPU_RESERVE_GB = 2.0
# Live intermediates of DMD's no-grad CFG teacher forward (batch 2B), in units of one block's saved tensors at
# batch B: between 1 (bf16, large) and 2 (fp32, tiny) in the measurements of benchmarks/memory.py; 1.5 keeps
# every measured case within 15%.
DMD_TRANSIENT_BLOCKS = 1.5  # CUDA context, NCCL buffers, allocator slack: not available to tensors
REPO = Path(__file__).resolve().parents[1]
WAN_CONFIGS = {"Wan2.1-T2V-1.3B": "configs/train/wan/t2v_1.3b_dmd.yaml",
               "Wan2.1-T2V-14B": "configs/train/wan/t2v_14b_dmd.yaml",
               "Wan2.1-I2V-14B-480P": "configs/train/wan/i2v_14b_480p_dmd.yaml"}


@dataclass
class Plan:
    params: int  # parameters of one DiT
    trainable: int  # trainable parameters per trainable network (LoRA mode: the adapter)
    tokens: int  # tokens per sample
    engine: str
    gpus: int
    memory: dict[str, float]  # GiB per GPU, by item
    cpu_memory: dict[str, float] = field(default_factory=dict)  # GiB per process, offloaded states
    flops_per_iter: float = 0.0  # per process
    host_memory: dict[str, float] = field(default_factory=dict)  # GiB per node, by item (host_memory())
    checkpoint_gib: float = 0.0  # one checkpoint on disk: trainable networks and EMA in fp32, AdamW states

    @property
    def peak(self) -> float:
        return self.memory["peak"]

    def table(self) -> str:
        rows = [f"DiT parameters: {self.params / 1e9:.3f} B; trainable per network: {self.trainable / 1e6:.1f} M; "
                f"tokens per sample: {self.tokens}; engine {self.engine} on {self.gpus} GPU(s)"]
        rows += [f"  {k:<46s}{v:10.2f} GiB" for k, v in self.memory.items()]
        rows += [f"  CPU: {k:<41s}{v:10.2f} GiB" for k, v in self.cpu_memory.items()]
        rows.append(f"  FLOPs per iteration and process (x grad_accum): {self.flops_per_iter / 1e12:.2f} TFLOP")
        rows += [f"  host: {k:<40s}{v:10.2f} GiB" for k, v in self.host_memory.items()]
        rows.append(f"  disk: one checkpoint (networks, EMA, AdamW)     {self.checkpoint_gib:10.2f} GiB")
        return "\n".join(rows)


def dit_config(cfg: TrainConfig) -> dict:
    if cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
        return json.loads((Path(cfg.model.path) / "config.json").read_text())
    return get_spec(cfg.model.spec).dit


def _meta_model(config: dict, **changes) -> WanModel:
    with torch.device("meta"):
        return WanModel.from_config({**config, **changes})


def count_params(config: dict, cfg: TrainConfig | None = None) -> tuple[int, int, int, int]:
    """(all parameters, Linear weights, largest block, LoRA adapter parameters) of a DiT on the meta device."""
    from distill.adapters import target_names

    model = _meta_model(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    adapter = 0
    if cfg is not None and cfg.lora.enabled:
        r = cfg.lora.rank
        for name in target_names(model, cfg.lora.target_modules):
            m = model.get_submodule(name)
            adapter += r * (m.in_features + m.out_features)
    return sum(p.numel() for p in model.parameters()), linear, block, adapter


PARAM_VIEWS = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0",
               "ExpandBackward0", "UnsafeViewBackward0"}


class _FusedAttention(torch.autograd.Function):
    """What flash / memory-efficient attention keep for backward: q, k, v, out and the log-sum-exp [B, H, L]."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, L, H, d] each
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


def saved_activation_bytes(config: dict, grid: tuple[int, int, int], num_layers: int, checkpointing: bool,
                           autocast: bool, lora: tuple[int, tuple[str, ...]] | None = None) -> int:
    """Bytes autograd keeps for backward in one forward of a `num_layers`-block DiT of `config` at batch 1,
    parameters and autocast's bf16 copies of them excluded; distinct storages counted once (views share them).

    Run for real on the CPU (uninitialised weights: only sizes matter) with CPU bf16 autocast when `autocast`,
    so dtypes follow the model's own casts; attention is replaced by `_FusedAttention` (what the flash and
    memory-efficient kernels save). `lora` = (rank, target regexes): LoRA mode, adapters on a frozen base and an
    input that needs no gradient (what the generator sees): frozen layers then save only what the adapters and
    the input gradients of later layers need."""
    with torch.device("meta"):
        model = WanModel.from_config({**config, "num_layers": num_layers})
    model = model.to_empty(device="cpu")
    model.gradient_checkpointing = checkpointing
    if lora is not None:
        from distill.adapters import with_lora

        model = with_lora(model.requires_grad_(False), lora[0], float(lora[0]), lora[1])
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    param_ids = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def weight_cast(t: Tensor) -> bool:
        """A parameter seen through casts and views (autocast's bf16 copy, its transpose): planned as its own
        item ("bf16 weight casts"), not an activation."""
        fn, casts = t.grad_fn, 0
        while fn is not None and type(fn).__name__ in PARAM_VIEWS and len(fn.next_functions) == 1:
            casts += type(fn).__name__.startswith("ToCopy")
            fn = fn.next_functions[0][0]
        return casts > 0 and id(getattr(fn, "variable", None)) in param_ids

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and not weight_cast(t):
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    f, h, w = grid
    z = config["out_dim"]
    x = torch.zeros(1, z, f, h, w, requires_grad=lora is None)
    y = torch.zeros(1, config["in_dim"] - z, f, h, w) if config["model_type"] in ("i2v", "flf2v") else None
    ctx = torch.zeros(1, config["text_len"], config.get("text_dim", 4096))
    clip_dim = config.get("clip_dim", 1280)  # None: an I2V DiT without a CLIP branch (the Wan2.2 I2V experts)
    clip = torch.zeros(1, 257, clip_dim) if y is not None and clip_dim is not None else None
    # TI2V: per-token timesteps [1, L] (an image-conditioned sample: a modulation per token, the larger case)
    pt, ph, pw = config.get("patch_size", (1, 2, 2))
    t = torch.full((1, (f // pt) * (h // ph) * (w // pw)) if config["model_type"] == "ti2v" else (1,), 500.0)
    amp = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    orig = wan_layers.attention
    wan_layers.attention = _FusedAttention.apply
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            model(x, t, ctx, clip_fea=clip, y=y)
    finally:
        wan_layers.attention = orig
    return sum(seen.values())


@functools.lru_cache(maxsize=64)
def _activation_memory(config_json: str, tokens: int, batch: int, checkpointing: bool, autocast: bool,
                       extra_blocks: float, lora: tuple[int, tuple[str, ...]] | None) -> float:
    return activation_memory(json.loads(config_json), tokens, batch, checkpointing, autocast, extra_blocks, lora)


def narrowed(config: dict, max_dim: int = 768) -> tuple[dict, int]:
    """(config with dim, ffn_dim and heads divided by k, k): per-token activations are linear in the width at a
    fixed head size, so tracing a k-times narrower model and multiplying by k costs 1/k^2 of the weights (a 2-block
    14B trace would allocate 2.8 GB). k is the largest divisor of num_heads with dim / k >= min(dim, max_dim)."""
    heads = config["num_heads"]
    k = max(d for d in range(1, heads + 1) if heads % d == 0 and config["dim"] // d >= min(config["dim"], max_dim))
    if k == 1:
        return config, 1
    return {**config, "dim": config["dim"] // k, "ffn_dim": config["ffn_dim"] // k, "num_heads": heads // k}, k


def activation_memory(config: dict, tokens: int, batch: int, checkpointing: bool, autocast: bool,
                      extra_blocks: float = 0.0, lora: tuple[int, tuple[str, ...]] | None = None) -> float:
    """Bytes of activations at the peak of one forward + backward of the full DiT on `tokens` tokens.

    Saved bytes are affine in the tokens (fused attention: no tokens^2 term) and in the number of blocks, so
    four small traces (1 and 2 blocks, 16 and 32 tokens) give per-block and outside-the-blocks slopes and
    constants (the text context's keys and values are the constants). Without checkpointing: every block's
    saved tensors; with it: every block's input, plus one block's saved tensors while it is recomputed.
    `extra_blocks`: blocks' worth of transient memory beside the saved graph (DMD: the no-grad teacher forward
    with CFG, at twice the batch, runs while the generator's graph is alive; DMD_TRANSIENT_BLOCKS). `lora`:
    (rank, targets) of LoRA mode (`saved_activation_bytes`)."""

    small, k = narrowed(config)
    # the adapters' rank-r tensors do not narrow with the width: trace rank r / k so that k times it is r
    small_lora = None if lora is None else (max(1, lora[0] // k), tuple(lora[1]))

    def saved(layers: int, ckpt: bool) -> tuple[float, float]:  # (bytes per token, constant) of a forward
        a, b = (k * saved_activation_bytes(small, (g, 8, 8), layers, ckpt, autocast, small_lora) for g in (1, 2))
        return float(b - a) / 16, float(2 * a - b)

    (s1, c1), (s2, c2) = saved(1, False), saved(2, False)
    block = (s2 - s1) * tokens + (c2 - c1)
    outside = (2 * s1 - s2) * tokens + (2 * c1 - c2)
    layers = config["num_layers"]
    if not checkpointing:
        return batch * (block * layers + outside + extra_blocks * block)
    (k1, d1), (k2, d2) = saved(1, True), saved(2, True)
    kept = (k2 - k1) * tokens + (d2 - d1)
    kept_outside = (2 * k1 - k2) * tokens + (2 * d1 - d2)
    return batch * (kept * layers + kept_outside + max(1.0, extra_blocks) * block)


def latent_grid(cfg: TrainConfig) -> tuple[int, int, int]:
    """Latent (f, h, w) of the training clips: temporal stride 4, the spatial stride of `model.spec`'s VAE
    (Wan VAE 8; the tiny PCA codec its own)."""
    vae = get_spec(cfg.model.spec).vae
    stride = 16 if vae["type"] == "wan22_vae" else vae.get("spatial_stride", 8)  # Wan2.2 VAE: 8x with a 2x2 patchify
    return 1 + (cfg.data.num_frames - 1) // 4, cfg.data.height // stride, cfg.data.width // stride


def estimate(cfg: TrainConfig, engine: str = "ddp", gpus: int = 1, gpus_per_node: int = 8,
             offload: bool = False, experts: bool = True) -> Plan:
    """Per-GPU memory of `cfg` trained with `engine` on `gpus` processes (see the module docstring); a two-expert
    teacher (Wan2.2 A14B) is planned by distill/moe_plan.py (`experts=False`: as if it were one DiT)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if experts:
        from distill.moe_plan import estimate_experts, two_experts

        if two_experts(cfg):
            return estimate_experts(cfg, engine, gpus, gpus_per_node, offload)
    offload = offload or cfg.distributed.cpu_offload
    config = dit_config(cfg)
    n, n_linear, n_block, n_adapter = count_params(config, cfg)
    grid = latent_grid(cfg)
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    mixed = cfg.mixed_precision != "no"
    lora = cfg.lora.enabled
    nets = {"pretrain": 1, "ode": 1, "dmd": 2}[cfg.task]  # trainable networks
    trainable = n_adapter if lora else n
    frozen = n if (lora or cfg.task == "dmd") else 0  # LoRA mode: the shared base; dmd: the teacher
    frozen_bytes = 2 if (cfg.task == "dmd" and cfg.dmd.real_score_dtype == "bf16") else 4
    ema = cfg.task in ("pretrain", "dmd")
    shard = {"ddp": 1, "zero2": 1, "fsdp": gpus, "zero3": gpus, "hybrid": min(gpus, gpus_per_node)}[engine]
    state_shard = gpus if engine == "zero2" else shard  # gradients / optimizer / EMA
    states = {
        "trainable parameters (fp32)": nets * 4 * trainable / shard,
        "frozen parameters (teacher / shared base)": frozen_bytes * frozen / (gpus if engine == "zero2" else shard),
        "gradients (fp32, one network at a time)": 4 * trainable / state_shard,
        "AdamW states (2 x fp32)": nets * 8 * trainable / state_shard,
        "EMA (fp32)": 4 * trainable / state_shard if ema else 0.0,
    }
    mem = {k: 0.0 if offload else v for k, v in states.items()}
    if shard > 1 or offload:  # all-gathered block weights in the compute dtype, current + prefetched
        mem["gathered block weights"] = 2 * n_block * (2 if mixed else 4)
    elif mixed and not lora:  # autocast caches a bf16 copy of each trainable linear weight until backward
        mem["bf16 weight casts (autocast)"] = 2 * n_linear
    ckpt = cfg.model.gradient_checkpointing
    extra = DMD_TRANSIENT_BLOCKS if cfg.task == "dmd" else 0.0
    mem["activations"] = _activation_memory(json.dumps(config, sort_keys=True), tokens, cfg.batch_size, ckpt, mixed,
                                            extra, (cfg.lora.rank, tuple(cfg.lora.target_modules)) if lora else None)
    # foreach AdamW builds one parameter-sized fp32 temporary of the network it steps
    mem["optimizer step temporary (fp32)"] = 0.0 if offload else 4 * trainable / state_shard
    mem = {k: v / GB for k, v in mem.items()}
    # Two peaks: the backward (activations alive, gradients still being produced: counted at the step) and the
    # optimizer step (gradients complete, activations and autocast casts freed).
    step_only = ("gradients (fp32, one network at a time)", "optimizer step temporary (fp32)")
    backward_only = ("activations", "bf16 weight casts (autocast)")
    mem["peak in backward"] = sum(v for k, v in mem.items() if k not in step_only)
    mem["peak in optimizer step"] = sum(v for k, v in mem.items() if k not in backward_only + ("peak in backward",))
    mem["peak"] = max(mem["peak in backward"], mem["peak in optimizer step"])
    cpu = {k: v / GB for k, v in states.items()} if offload else {}
    if cfg.task != "pretrain" and image_encoder_params(cfg):  # I2V: CLIP and VAE run on the GPU per batch
        for key in ("peak in backward", "peak in optimizer step", "peak"):
            mem[key] += 4 * image_encoder_params(cfg) / GB
        clip = dit_config(cfg)["model_type"] in ("i2v", "flf2v") and not cfg.model.spec.startswith("wan2.2")
        label = "I2V encoders (CLIP + VAE, fp32)" if clip else "image encoder (VAE, fp32)"  # Wan2.2: no CLIP
        mem = {label: 4 * image_encoder_params(cfg) / GB, **mem}
    host = host_memory(cfg, n, engine, gpus, sum(cpu.values()), gpus_per_node)
    disk = (nets * 12 * trainable + (4 * trainable if ema else 0)) / GB  # fp32 weights + 2 AdamW moments; EMA
    return Plan(n, trainable, tokens, engine, gpus, mem, cpu, flops(cfg, config, n_linear, tokens), host, disk)


# ---- host RAM ---------------------------------------------------------------------------------------------------
PLAN_PROMPTS = 40_000  # prompts assumed when the config's list cannot be read (Self-Forcing's list is ~40k)
PLAN_TOKENS = 128  # mean umT5 tokens per prompt assumed for the in-memory text cache (of text_len 512)
STORE_INDEX_BYTES = 12  # per prompt in RAM with the prompt store: int64 offset + int32 length


@functools.lru_cache(maxsize=16)
def _encoder_params(spec: str) -> tuple[int, int, int]:
    """(umT5, CLIP, VAE) parameters of a registry spec, counted on the meta device (CLIP 0 for T2V)."""
    from models.clip import CLIPImageEncoder
    from models.codec import PCACodec
    from models.t5 import UMT5Encoder

    s = get_spec(spec)
    args = lambda d: {k: v for k, v in d.items() if k != "type"}  # noqa: E731
    with torch.device("meta"):
        text = UMT5Encoder(**args(s.text_encoder))
        clip = CLIPImageEncoder(**args(s.image_encoder)) if s.image_encoder else None
        if s.vae["type"] == "wan_vae":
            from models.vae import WanVAE

            vae = WanVAE(**args(s.vae))
        elif s.vae["type"] == "wan22_vae":  # Wan2.2 TI2V-5B
            from models.vae22 import Wan22VAE

            vae = Wan22VAE(**args(s.vae))
        else:
            vae = PCACodec(**args(s.vae))
    count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(text), count(clip), count(vae)


def image_encoder_params(cfg: TrainConfig) -> int:
    """CLIP + VAE parameters for an I2V DiT (model.path's config.json, else model.spec), 0 for T2V; a T2V spec
    name with an I2V folder counts the I2V components of its family (tiny or Wan2.1). TI2V-5B: the Wan2.2 VAE,
    which encodes the start images on the GPU when data.image_fraction is not 0."""
    model_type = dit_config(cfg)["model_type"]
    if model_type == "ti2v":
        return _encoder_params("wan2.2-ti2v-5b")[2] if cfg.data.image_fraction != 0 else 0
    if model_type not in ("i2v", "flf2v"):
        return 0
    spec = cfg.model.spec
    if spec.startswith("wan2.2"):  # the Wan2.2 I2V experts take no CLIP features: the VAE alone encodes the image
        return _encoder_params(spec)[2]
    if not get_spec(spec).image_encoder:
        spec = "tiny-i2v" if spec.startswith("tiny") else "wan2.1-i2v-14b-480p"
    _, clip, vae = _encoder_params(spec)
    return clip + vae


def prompt_count(cfg: TrainConfig) -> tuple[int, bool]:
    """(number of training prompts, whether counted) — PLAN_PROMPTS when the list cannot be read here."""
    if cfg.data.source == "shapes":
        from data.shapes import PROMPTS

        return len(PROMPTS), True
    try:
        from distill.data import source_prompts

        return len(source_prompts(cfg)), True
    except (FileNotFoundError, ValueError):
        return PLAN_PROMPTS, False


def host_memory(cfg: TrainConfig, params: int, engine: str, gpus: int, offloaded_gib: float,
                gpus_per_node: int = 8) -> dict[str, float]:
    """Host RAM of one node (GiB): per process the offloaded states, the umT5 copy the trainer loads (fp32, on the
    CPU) and the text embeddings (the prompt store's index, or the in-memory cache of PLAN_TOKENS tokens per
    prompt; "N?" prompts: PLAN_PROMPTS assumed, the list not readable here); once per node the weights read at
    start-up (DDP: every process builds its networks in fp32 on the CPU before moving them; sharded engines: the
    loading rank reads one network's fp32 state dict at a time)."""
    procs = min(gpus, gpus_per_node)
    text_params, _, _ = _encoder_params(cfg.model.spec)
    prompts, counted = prompt_count(cfg)
    dim = get_spec(cfg.model.spec).text_encoder["dim"]
    text = STORE_INDEX_BYTES * prompts if cfg.data.text_store else 4 * prompts * PLAN_TOKENS * dim
    copies = {"dmd": 1 if cfg.lora.enabled else 3, "ode": 1, "pretrain": 1}[cfg.task]
    load = copies * 4 * params * procs if engine == "ddp" else 4 * params
    how = "store index" if cfg.data.text_store else "in-RAM cache"
    items = {
        f"offloaded states (x{procs} processes)": procs * offloaded_gib,
        f"umT5 text encoder, fp32 (x{procs})": procs * 4 * text_params / GB,
        f"text: {how}, {prompts}{'' if counted else '?'} prompts (x{procs})": procs * text / GB,
        "weights read at start-up (transient)": load / GB,
    }
    items["peak per node"] = sum(items.values())
    return items


def flops(cfg: TrainConfig, config: dict, n_linear: int, tokens: int) -> float:
    """FLOPs per iteration and process: 2 per MAC; a forward is 2 N_lin T (linears) + per layer 4 T^2 D (self
    attention) + 4 T L_ctx D (cross attention); backward = 2 forwards."""
    d, layers, ctx = config["dim"], config["num_layers"], config["text_len"]
    fwd = cfg.batch_size * (2 * n_linear * tokens + layers * (4 * tokens**2 * d + 4 * tokens * ctx * d))
    steps = len(cfg.distill.denoising_step_list)
    per_task = {
        "pretrain": 3 * fwd,
        "ode": 3 * fwd,
        # generator iteration (every ratio): rollout (~steps/2 no-grad) + graded step (3x) + teacher with CFG
        # (2x) + critic (1x); critic every iteration: rollout + forward/backward (3x)
        "dmd": (steps / 2 + 3 + 2 + 1) * fwd / cfg.dmd.dfake_gen_update_ratio + (steps / 2 + 3) * fwd,
    }
    return per_task[cfg.task] * cfg.grad_accum


def min_gpus(cfg: TrainConfig, engine: str, gpu_mem: float, offload: bool = False,
             candidates: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)) -> tuple[int | None, Plan]:
    """Smallest process count whose per-GPU peak fits `gpu_mem` GiB minus GPU_RESERVE_GB (None: none)."""
    plan = None
    for p in candidates:
        if engine == "hybrid" and p > 8 and p % 8:
            continue
        plan = estimate(cfg, engine, p, offload=offload)
        if plan.peak <= gpu_mem - GPU_RESERVE_GB:
            return p, plan
    return None, plan


def implemented(engine: str, lora: bool, offload: bool) -> bool:
    """Whether the trainer runs this combination (distill/engines.py): LoRA mode under ddp; CPU offload with
    FSDP2 (`distributed.cpu_offload`) for full-parameter DMD."""
    if lora:
        return engine == "ddp" and not offload
    return not offload or engine in ("fsdp", "hybrid")


def wan_table(gpu_mem: float = 80.0) -> str:
    """Markdown: minimum GPUs of `gpu_mem` GiB for full-parameter and LoRA-mode DMD of the Wan2.1 configs."""
    rows = [f"| model | mode | {' | '.join(ENGINES)} | fsdp + CPU offload |", "|---|---|" + "---|" * (len(ENGINES) + 1)]
    for name, path in WAN_CONFIGS.items():
        for mode in ("full", "lora"):
            cfg = load_train_config(REPO / path, [f"lora.enabled={mode == 'lora'}"])
            cells = []
            for engine, offload in [(e, False) for e in ENGINES] + [("fsdp", True)]:
                p, plan = min_gpus(cfg, engine, gpu_mem, offload)
                mark = "" if implemented(engine, mode == "lora", offload) else " †"
                cells.append((f"{p} ({plan.peak:.0f} GiB)" if p else f"> 128 ({plan.peak:.0f} GiB at 128)") + mark)
            rows.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training YAML (with --gpus/--engine: print its plan)")
    p.add_argument("--table", action="store_true", help="minimum GPUs for the Wan2.1 DMD configs, every engine")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--engine", choices=ENGINES, default="ddp")
    p.add_argument("--offload", action="store_true", help="parameters, gradients, optimizer states, EMA in CPU memory")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.table:
        print(f"Minimum number of {a.gpu_mem:.0f} GiB GPUs (per-GPU peak in brackets; {GPU_RESERVE_GB:.0f} GiB "
              f"reserved per GPU), batch 1 per GPU, 81 frames at 480x832 (32,760 tokens), per-block "
              f"activation checkpointing, bf16 teacher:\n")
        print(wan_table(a.gpu_mem))
        return
    if not a.config:
        p.error("--config or --table is required")
    plan = estimate(load_train_config(a.config, a.overrides), a.engine, a.gpus, offload=a.offload)
    print(plan.table())
    fits = plan.peak <= a.gpu_mem - GPU_RESERVE_GB
    print(f"fits {a.gpu_mem:.0f} GiB GPUs: {'yes' if fits else 'no'} (peak {plan.peak:.1f} GiB)")


if __name__ == "__main__":
    main()


