"""Mini Wan2.1 model folders: the real file layout, architectures and key names at reduced width and depth, with
seeded random weights, for rehearsing every real-model command on a CPU in seconds (Wan2.2 A14B two-expert
folders: models/mini_moe.py, `write_mini(..., moe=True)`).

Two layouts of the same weights (the same seed gives the same tensors in both):

- `official`, as the Wan-AI repositories ship it: `config.json`, `diffusion_pytorch_model.safetensors` (or
  shards `diffusion_pytorch_model-0000i-of-0000n.safetensors` + `.safetensors.index.json`), `Wan2.1_VAE.pth`,
  `models_t5_umt5-xxl-enc-bf16.pth` (bf16; the fp32 networks hold bf16-exact values), `google/umt5-xxl/`
  (tokenizer.json, tokenizer_config.json, special_tokens_map.json), and for I2V
  `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` with an `xlm-roberta-large/` tokenizer folder.
- `diffusers`, as `WanPipeline.from_pretrained` / `WanImageToVideoPipeline.from_pretrained` read it:
  `model_index.json`, `transformer/`, `vae/`, `text_encoder/` (transformers `UMT5EncoderModel`), `tokenizer/`,
  `scheduler/`, I2V also `image_encoder/` (transformers `CLIPVisionModel`) and `image_processor/`. Writing it
  needs diffusers and transformers (test dependencies); reading it in this project does not.

The tokenizers are small Unigram vocabularies trained with `tokenizers` in the format of the real
`tokenizer.json` (Metaspace pre-tokenizer, `</s>` appended by the post-processor, ids 0/1/2 = pad/eos/unk). The
real folders also hold a SentencePiece `spiece.model`; it is not written (nothing here reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.clip import CLIPImageEncoder
from models.loading import DIT_CONFIG, DIT_WEIGHTS, write_safetensors
from models.registry import WAN_FILES, get_spec
from models.t5 import UMT5Encoder
from models.vae import WanVAE
from models.wan_model import WanModel

TASKS = ("t2v", "i2v")
LAYOUTS = ("official", "diffusers")

# Real architecture, reduced: DiT heads of 32 channels (RoPE splits them 12/10/10), the real 512 text tokens;
# VAE with the real level structure at base width 8; umT5 and CLIP with two blocks; CLIP keeps patch 14 and
# ViT-H's 80-channel heads at a 56-pixel input (17 tokens).
MINI_DIT = dict(dim=64, ffn_dim=128, freq_dim=64, num_heads=2, num_layers=2, text_len=512, out_dim=16, eps=1e-6)
MINI_VAE = dict(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
MINI_UMT5 = dict(dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)
MINI_CLIP = dict(image_size=56, patch_size=14, dim=160, mlp_ratio=4, out_dim=32, num_heads=2, num_layers=2)
MINI_VOCAB = 384  # an upper bound: the Unigram trainer keeps only the pieces the small corpus supports
XLM_ROBERTA_DIR = "xlm-roberta-large"

# Text the tokenizer vocabulary is trained on: the shapes-world words, common prompt words and the negative
# prompt of the configs, so that real prompts tokenize into a handful of pieces each.
_CORPUS_WORDS = (
    "a an the red green blue yellow orange purple white cyan magenta circle square triangle moving left right up "
    "down cat dog person walking running on in at with of and sea beach city street night day sun light camera "
    "slowly fast close-up wide shot video image style bright colors overexposed static blurry details subtitles "
    "painting still picture gray worst quality low jpeg compression ugly incomplete extra fingers poorly drawn "
    "hands faces deformed disfigured misshapen limbs fused motionless cluttered background three legs many people "
    "behind walking backwards")


@dataclass
class MiniModel:
    """The networks of one mini model (fp32, random weights) and its tokenizer."""

    task: str
    dit: WanModel
    vae: WanVAE
    text_encoder: UMT5Encoder
    image_encoder: CLIPImageEncoder | None
    tokenizer: Any  # tokenizers.Tokenizer


def _check(task: str, layout: str | None = None) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# (special tokens in id order, template of one sequence, tokenizer_config.json fields) of the two tokenizers.
_UMT5_TOKENS = (["<pad>", "</s>", "<unk>"], "$A </s>",
                {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "T5Tokenizer",
                 "extra_ids": 0, "additional_special_tokens": []})
_XLMR_TOKENS = (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>",
                {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                 "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
                 "tokenizer_class": "XLMRobertaTokenizer"})


def mini_tokenizer(vocab_size: int = MINI_VOCAB, kind: str = "umt5"):
    """A Unigram `tokenizers.Tokenizer` in the real tokenizer.json format (Metaspace pre-tokenizer), trained on a
    small corpus; deterministic. "umt5": ids 0/1/2 = `<pad>`/`</s>`/`<unk>`, `</s>` appended (google/umt5-xxl);
    "xlm-roberta": `<s>`/`<pad>`/`</s>`/`<unk>`/`<mask>`, `<s> ... </s>` (xlm-roberta-large)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    specials, template, _ = {"umt5": _UMT5_TOKENS, "xlm-roberta": _XLMR_TOKENS}[kind]
    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False)
    words = _CORPUS_WORDS.split()
    corpus = [" ".join(words[i:i + 7]) for i in range(len(words))] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    used = [t for t in specials if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, pair=f"{template} $B </s>",
                                                       special_tokens=[(t, specials.index(t)) for t in used])
    return tok


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Weights of a useful scale everywhere (the reference inits zero the DiT head and the VAE attention
    output, which would make a random model's video constant): matrices ~ N(0, 1/fan_in), 1-d norm scales
    ~ 1 + 0.1 N, other vectors (biases) ~ 0.1 N, `nn.Embedding` tables ~ N(0, 1)."""
    lookup = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if name in lookup:  # token and relative-position tables: looked up, not multiplied
            p.copy_(noise)
        elif p.ndim >= 2:
            p.copy_(noise / max(1, p[0].numel()) ** 0.5)
        elif "norm" in name or "gamma" in name:
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return module


def _gamma_to_one_d(vae: WanVAE, generator: torch.Generator) -> None:
    """The VAE's RMSNorm scales are [C, 1, 1(, 1)]: randomize() treated them as matrices; make them 1 + 0.1 N."""
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))


# The real Wan2.1-T2V-1.3B geometry for GPU rehearsals (scripts/gpu_rehearsal.sh): the real DiT and VAE, umT5 at
# the real width (its 4096-dim output feeds the DiT) with two blocks, since the encoder runs once per prompt.
GEOMETRIES = ("mini", "1.3b")
UMT5_1_3B_REHEARSAL = dict(dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=2, num_buckets=32)


def _random(factory, generator: torch.Generator) -> nn.Module:
    """Build on `meta` (no default init: 1.4B parameters would take a minute), allocate, draw the weights."""
    with torch.device("meta"):
        module = factory()
    return randomize(module.to_empty(device="cpu"), generator)


def mini_configs(task: str, geometry: str = "mini") -> dict[str, dict[str, Any]]:
    """Constructor configs of the DiT (official config.json fields), VAE, umT5 (without vocab_size) and CLIP
    (None for T2V) of a mini model, or of the real 1.3B geometry (T2V only)."""
    _check(task)
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if geometry == "1.3b":
        if task != "t2v":
            raise ValueError("geometry '1.3b' is Wan2.1-T2V-1.3B: there is no I2V model of that size")
        return dict(dit=get_spec("wan2.1-t2v-1.3b").dit, vae={}, umt5=dict(UMT5_1_3B_REHEARSAL), clip=None)
    dit = dict(model_type=task, in_dim=16 if task == "t2v" else 36, text_dim=MINI_UMT5["dim"], **MINI_DIT)
    if task == "i2v":
        dit["clip_dim"] = MINI_CLIP["dim"]
    return dict(dit=dit, vae=dict(MINI_VAE), umt5=dict(MINI_UMT5), clip=dict(MINI_CLIP) if task == "i2v" else None)


@torch.no_grad()
def build_mini(task: str, seed: int = 0, geometry: str = "mini") -> MiniModel:
    """The networks of a mini model for `task` ("t2v" | "i2v"), random weights drawn from `seed`; `geometry`
    "1.3b" gives the real Wan2.1-T2V-1.3B DiT and VAE instead (see UMT5_1_3B_REHEARSAL for the text encoder)."""
    cfg = mini_configs(task, geometry)
    g = torch.Generator().manual_seed(seed)
    tokenizer = mini_tokenizer()
    text = _random(lambda: UMT5Encoder(vocab_size=tokenizer.get_vocab_size(), **cfg["umt5"]), g)
    text.to(torch.bfloat16).float()  # the official file is bf16: both layouts hold the bf16-exact values
    vae = randomize(WanVAE(**cfg["vae"]), g)  # built normally: its latent statistics are buffers
    _gamma_to_one_d(vae, g)
    image = _random(lambda: CLIPImageEncoder(**cfg["clip"]), g) if cfg["clip"] is not None else None
    dit = _random(lambda: WanModel.from_config(cfg["dit"]), g)
    for m in (text, vae, dit) + ((image,) if image is not None else ()):
        m.eval().requires_grad_(False)
    return MiniModel(task, dit, vae, text, image, tokenizer)


def write_mini(out: str | Path, task: str, layout: str = "official", sharded: bool = False,
               seed: int = 0, geometry: str = "mini", moe: bool = False) -> Path:
    """Write a mini model folder of `layout` for `task` to `out` (created; must be empty or absent).
    `moe`: a Wan2.2 A14B two-expert folder instead (models/mini_moe.py; mini geometry only)."""
    _check(task, layout)
    if moe:
        if geometry != "mini":
            raise ValueError(f"a mini Wan2.2 A14B folder has the mini geometry, got geometry {geometry!r}")
        from models.mini_moe import write_mini_moe

        return write_mini_moe(out, task, layout, sharded, seed)
    mini_configs(task, geometry)  # bad geometry: an error before anything is written
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model = build_mini(task, seed, geometry)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "official":
        write_official(out, model, sharded)
    else:
        from models.mini_diffusers import write_diffusers  # needs diffusers + transformers

        write_diffusers(out, model, sharded)
    return out


# ------------------------------------------------------------------------------------------------------------
# official layout

def shard_state(state: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into `num_shards` parts of consecutive keys (sorted), sizes as even as possible."""
    keys = sorted(state)
    if not 1 <= num_shards <= len(keys):
        raise ValueError(f"num_shards must be in [1, {len(keys)}], got {num_shards}")
    bounds = [round(i * len(keys) / num_shards) for i in range(num_shards + 1)]
    return [{k: state[k] for k in keys[a:b]} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write_sharded_safetensors(folder: Path, state: dict[str, torch.Tensor], stem: str, num_shards: int) -> Path:
    """`stem`-0000i-of-0000n.safetensors + `stem`.safetensors.index.json (the layout of the 14B DiT and of
    transformers/diffusers sharded checkpoints); returns the index path."""
    base = stem.removesuffix(".safetensors")
    weight_map, total = {}, 0
    for i, part in enumerate(shard_state(state, num_shards), start=1):
        name = f"{base}-{i:05d}-of-{num_shards:05d}.safetensors"
        write_safetensors(part, folder / name)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = folder / f"{stem}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return index


def write_tokenizer_folder(folder: Path, tokenizer, kind: str = "umt5") -> Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, as in the real `google/umt5-xxl`
    ("umt5") or `xlm-roberta-large` ("xlm-roberta") folders."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {**{"umt5": _UMT5_TOKENS, "xlm-roberta": _XLMR_TOKENS}[kind][2], "model_max_length": 512}
    special = {k: v for k, v in config.items() if k.endswith("_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def write_official(out: Path, model: MiniModel, sharded: bool = False) -> Path:
    """The official Wan2.1 folder layout (see the module docstring)."""
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", **model.dit.config}
    (out / DIT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if sharded:
        write_sharded_safetensors(out, model.dit.state_dict(), DIT_WEIGHTS, num_shards=3)
    else:
        write_safetensors(model.dit.state_dict(), out / DIT_WEIGHTS)
    return write_shared_files(out, model)


def write_shared_files(out: Path, model: MiniModel) -> Path:
    """The official folder's files other than the DiT: VAE, umT5 + tokenizer, CLIP + tokenizer when present."""
    torch.save(_plain(model.vae.state_dict()), out / WAN_FILES["vae"])
    torch.save(_plain(model.text_encoder.state_dict(), torch.bfloat16), out / WAN_FILES["text_encoder"])
    write_tokenizer_folder(out / WAN_FILES["tokenizer"], model.tokenizer)
    if model.image_encoder is not None:
        torch.save(_plain(model.image_encoder.state_dict()), out / WAN_FILES["image_encoder"])
        write_tokenizer_folder(out / XLM_ROBERTA_DIR, mini_tokenizer(kind="xlm-roberta"), "xlm-roberta")
    return out


def _plain(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (optionally cast): what the official .pth files hold (a flat dict of tensors)."""
    return {k: (v.to(dtype) if dtype is not None else v).detach().clone().contiguous() for k, v in state.items()}
