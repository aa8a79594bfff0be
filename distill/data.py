"""Training batches: the shapes world (rendered on the fly, encoded to latents) and prompt lists (text from an
in-memory cache or the on-disk prompt store of distill/encode_prompts.py; I2V images from pairs sources).

Every video is a pure function of (data seed, step, micro-batch, rank, index), so the data position of a
run is its step counter: a resumed run sees exactly the batches the killed one would have seen, and two
processes never see the same video.

Text tables (`TextCache`, `encode_prompts.PromptStore`) share one interface: `rows(index) -> [B, text_len, dim]`
fp32 zero-padded per batch, rows in prompt-list order, the negative prompt at `negative_row` (the last row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from data.shapes import PROMPTS, ShapesWorld
from distill.losses import Cond
from distill.prompts import DATASET_SUFFIXES, load_prompts
from inference.pipeline import image_condition, image_to_tensor
from inference.video import read_image

if TYPE_CHECKING:
    from distill.ti2v import TI2VBatch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TextCache:
    """Text embeddings of a prompt list computed once and held in RAM, trimmed ([L_i, dim] fp32 each); rows
    are padded per batch. For short lists (the shapes world); long lists use the prompt store."""

    def __init__(self, text_encoder, prompts: Sequence[str], text_len: int) -> None:
        self.prompts, self.text_len = list(prompts), text_len
        unique = list(dict.fromkeys(self.prompts))
        self.table = {p: e[:text_len].float().cpu() for p, e in zip(unique, text_encoder.encode(unique))}
        self.negative_row = len(self.prompts) - 1

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """[B, text_len, dim] for prompts of the cached list (a KeyError names an unknown prompt)."""
        return _pad([self.table[p] for p in prompts], self.text_len)

    def rows(self, index: Sequence[int]) -> Tensor:
        """[B, text_len, dim] fp32 for rows `index` of the prompt list."""
        return self([self.prompts[int(i)] for i in index])


def _pad(embs: Sequence[Tensor], text_len: int) -> Tensor:
    out = torch.zeros(len(embs), text_len, embs[0].shape[-1])
    for b, e in enumerate(embs):
        out[b, : len(e)] = e.float()
    return out


class ShapesBatches:
    """Batches of (latent x0, conditioning) from the shapes world; I2V adds y and CLIP features."""

    def __init__(self, world: ShapesWorld, vae, text: TextCache, cfg_dropout: float, seed: int,
                 rank: int = 0, world_size: int = 1, image_encoder=None) -> None:
        self.world, self.vae, self.text = world, vae, text
        self.cfg_dropout, self.seed = cfg_dropout, seed
        self.rank, self.world_size = rank, world_size
        self.image_encoder = image_encoder

    def video_seeds(self, step: int, micro: int, accum: int, batch: int) -> list[int]:
        """Distinct seeds per (step, micro, rank, i); independent of the number of processes' interleaving."""
        base = ((step * accum + micro) * self.world_size + self.rank) * batch
        return [self.seed * 1_000_003 + base + i for i in range(batch)]

    @torch.no_grad()
    def get(self, step: int, micro: int = 0, accum: int = 1, batch: int = 8) -> tuple[Tensor, Cond, list[str]]:
        seeds = self.video_seeds(step, micro, accum, batch)
        prompts, videos = zip(*(self.world.sample(s) for s in seeds))
        video = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B,3,F,H,W]
        x0 = self.vae.encode(video).float()
        # per video (not per micro-batch): batch 2 x grad_accum 2 drops exactly the prompts batch 4 drops (the
        # key differs from the world's prompt [s, 1 << 20] and render [s, prompt index] keys)
        drop = [np.random.default_rng([int(s), 1 << 21]).random() < self.cfg_dropout for s in seeds]
        text_prompts = ["" if d else p for p, d in zip(prompts, drop)]
        cond = Cond(self.text(text_prompts))
        if self.image_encoder is not None:
            cond.clip_fea, cond.y = image_condition(self.vae, self.image_encoder, video[:, :, 0],
                                                    tuple(x0.shape[1:]))
        return x0, cond, list(prompts)


class ImagePairs:
    """I2V prompt/image pairs: the prompts in RAM (they index the text table), each image read when its batch
    is drawn (a file, or a row of a memory-mapped `datasets` table)."""

    def __init__(self, prompts: Sequence[str], read: Callable[[int], np.ndarray], source: str) -> None:
        self.prompts, self._read, self.source = list(prompts), read, source

    def __len__(self) -> int:
        return len(self.prompts)

    def image(self, i: int) -> np.ndarray:
        """Pair i's image, uint8 [H, W, 3]."""
        return self._read(int(i))


def load_pairs(path: str | Path, column: str = "prompt", image_column: str = "image") -> ImagePairs:
    """Prompt/image pairs from a json/jsonl/csv/parquet/arrow file or a `datasets` folder (an image column of
    paths, relative to the file's folder, or a `datasets.Image` column), or a folder of images each with a
    same-named .txt caption (`cat.png` + `cat.txt`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt/image source not found: {path} (expected a json/jsonl/csv/parquet/arrow "
                                f"file, a datasets folder, or a folder of images with .txt captions)")
    datasets_folder = path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())
    if path.is_dir() and not datasets_folder:
        return _caption_folder(path)
    if not datasets_folder and path.suffix not in DATASET_SUFFIXES:
        raise ValueError(f"{path}: I2V pairs need a json/jsonl/csv/parquet/arrow file, a datasets folder or a "
                         f"folder of images with .txt captions")
    import datasets

    ds = datasets.load_from_disk(str(path)) if datasets_folder else \
        datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    for col in (column, image_column):
        if col not in ds.column_names:
            raise ValueError(f"{path}: no column {col!r}; columns are {ds.column_names}")
    prompts = [str(p) for p in ds[column]]
    if isinstance(ds.features[image_column], datasets.Image):  # decoded one row at a time, never all at once
        images = ds.select_columns([image_column])
        return ImagePairs(prompts, lambda i: np.asarray(images[i][image_column].convert("RGB")), str(path))
    root = path if path.is_dir() else path.parent
    files = [str(p if Path(p).is_absolute() else root / p) for p in ds[image_column]]
    missing = [p for p in files if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {path} not found, e.g. {missing[:3]}")
    return ImagePairs(prompts, lambda i: read_image(files[i]), str(path))


def _caption_folder(folder: Path) -> ImagePairs:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with .txt captions")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} image(s) without a .txt caption, e.g. {missing[:3]}")
    prompts = [p.with_suffix(".txt").read_text().strip() for p in images]
    files = [str(p) for p in images]
    return ImagePairs(prompts, lambda i: read_image(files[i]), str(folder))


class PromptBatches:
    """Conditioning-only batches for distillation: prompts (and, for I2V, first frames of the shapes world or of
    a pairs source), text rows from a text table (`TextCache` or `PromptStore`).

    Prompt i of (step, micro, rank) is drawn from `prompts` with a generator seeded by those numbers, so the
    data position is the step counter (exact resume) and ranks see different prompts. I2V conditioning (CLIP
    features, first-frame latents) is computed per batch by `vae` / `image_encoder` on `device`.
    """

    def __init__(self, prompts: Sequence[str], text, seed: int, rank: int = 0, world_size: int = 1, vae=None,
                 image_encoder=None, world: ShapesWorld | None = None, images: ImagePairs | None = None,
                 device: torch.device | str = "cpu", image_fraction: float | None = None, i2v: bool | None = None
                 ) -> None:
        self.prompts, self.text = list(prompts), text
        # I2V conditioning (y, and CLIP features when there is an image encoder: the Wan2.2 I2V experts have none)
        self.i2v = image_encoder is not None if i2v is None else i2v
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.vae, self.image_encoder, self.world, self.images = vae, image_encoder, world, images
        self.device = torch.device(device)
        # TI2V (Wan2.2 TI2V-5B): None for other models; else the share of samples that start from their image
        self.image_fraction = image_fraction
        if image_fraction and world is None and images is None:
            raise ValueError(f"TI2V with data.image_fraction={image_fraction} needs conditioning images: "
                             "data.source=shapes or a prompt/image pairs source (or data.image_fraction=0)")
        if len(text) != len(self.prompts) + 1:
            raise ValueError(f"the text table holds {len(text)} rows; expected the {len(self.prompts)} prompts "
                             f"and the negative prompt")
        if self.i2v and world is None and images is None:
            raise ValueError("I2V distillation needs conditioning images: data.source=shapes, or a prompt/image "
                             "pairs source (data.prompt_path with data.image_column, or a captioned image folder)")
        self.row_of = {p: i for i, p in enumerate(self.prompts)} if world is not None else None

    def draw(self, step: int, micro: int, accum: int, batch: int) -> tuple[list[int], list[int]]:
        """(prompt rows, video seeds) of a batch."""
        index = ((step * accum + micro) * self.world_size + self.rank) * batch
        seeds = [self.seed * 1_000_003 + index + i for i in range(batch)]
        if self.world is not None:  # shapes: prompts from the world's own sampler (videos only for I2V images)
            return [self.row_of[self.world.sample_prompt(s)] for s in seeds], seeds
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(len(self.prompts), size=batch).tolist(), seeds

    @torch.no_grad()
    def get(self, step: int, micro: int, accum: int, batch: int,
            latent_shape: tuple[int, int, int, int]) -> tuple[Cond, Cond, list[str]]:
        """(cond, uncond, prompts) for a batch on `device`: context [B, text_len, dim]; I2V clip_fea
        [B, N, clip_dim] and y [B, 4 + z, f, h, w], shared by uncond (the negative prompt)."""
        rows, seeds = self.draw(step, micro, accum, batch)
        return self._conditioning(rows, seeds, latent_shape)

    @torch.no_grad()
    def _conditioning(self, rows: Sequence[int], seeds: Sequence[int],
                      latent_shape: tuple[int, int, int, int]) -> tuple[Cond, Cond, list[str]]:
        """(cond, uncond, prompts) of drawn rows (and their video seeds: the shapes world's first frames)."""
        batch = len(rows)
        prompts = [self.prompts[i] for i in rows]
        cond = Cond(self.text.rows(rows).to(self.device))
        uncond = Cond(self.text.rows([self.text.negative_row] * batch).to(self.device))
        if self.i2v:
            cond.clip_fea, cond.y = self.image_inputs(rows, seeds, latent_shape)
            uncond.clip_fea, uncond.y = cond.clip_fea, cond.y
        return cond, uncond, prompts

    @torch.no_grad()
    def get_ti2v(self, step: int, micro: int, accum: int, batch: int,
                 latent_shape: tuple[int, int, int, int]) -> tuple[Cond, Cond, list[str], TI2VBatch]:
        """TI2V: (cond, uncond, prompts) as `get` and the batch's `TI2VBatch` (distill/ti2v.py): sample i starts
        from its image with probability `image_fraction` (drawn from the data seed and the batch's position, so
        resume and the split across ranks see the same choice), its image fitted (scaled to cover, centre crop)
        to the training size and encoded alone by the Wan2.2 VAE: latent [z, 1, h, w] on frame 0."""
        from distill.ti2v import TI2VBatch
        from inference.ti2v_pipeline import fit_image

        rows, seeds = self.draw(step, micro, accum, batch)
        cond, uncond, prompts = self._conditioning(rows, seeds, latent_shape)
        index = ((step * accum + micro) * self.world_size + self.rank) * batch
        with_image = np.random.default_rng([self.seed, index, 2]).random(batch) < self.image_fraction
        latents: list[Tensor | None] = [None] * batch
        picked = [i for i in range(batch) if with_image[i]]
        if picked:
            _, _, h, w = latent_shape
            s = self.vae.spatial_stride
            frames = self.first_frames([rows[i] for i in picked], [seeds[i] for i in picked])
            images = torch.cat([fit_image(image_to_tensor(f)[None], h * s, w * s) for f in frames])
            encoded = self.vae.encode(images.to(self.device)[:, :, None]).float()  # [n, z, 1, h, w]
            for j, i in enumerate(picked):
                latents[i] = encoded[j]
        return cond, uncond, prompts, TI2VBatch.build(latents, latent_shape, self.device)

    def first_frames(self, rows: Sequence[int], seeds: Sequence[int]) -> list[np.ndarray]:
        """uint8 [H, W, 3] conditioning images: the shapes world's first frames, or the pairs' images."""
        if self.world is not None:
            return [self.world.render(self.prompts[r], s)[0] for r, s in zip(rows, seeds)]
        return [self.images.image(r) for r in rows]

    def image_inputs(self, rows: Sequence[int], seeds: Sequence[int],
                     latent_shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
        """(clip_fea, y) of the batch's first frames, resized to the training size, encoded on `device`."""
        frames = self.first_frames(rows, seeds)
        _, _, h, w = latent_shape
        size = (h * self.vae.spatial_stride, w * self.vae.spatial_stride)
        images = torch.cat([torch.nn.functional.interpolate(image_to_tensor(f)[None], size=size, mode="bicubic")
                            for f in frames]).clamp(-1, 1)
        return image_condition(self.vae, self.image_encoder, images.to(self.device), latent_shape)


def model_kind(model_type: str) -> str:
    """The conditioning a DiT's model_type takes: "i2v" (Wan2.1 I2V/FLF2V: CLIP features and y), "ti2v" (Wan2.2
    TI2V-5B: text alone or an image latent on frame 0, docs/wan22_ti2v.md) or "t2v"."""
    return "i2v" if model_type in ("i2v", "flf2v") else "ti2v" if model_type == "ti2v" else "t2v"


def config_kind(cfg) -> str:
    """`model_kind` of the config's DiT (model.path's config.json, else model.spec)."""
    from distill.plan import dit_config

    return model_kind(dit_config(cfg)["model_type"])


def is_i2v(cfg) -> bool:
    """Whether the config's DiT takes Wan2.1 image conditioning (CLIP features and y)."""
    return config_kind(cfg) == "i2v"


def image_fraction(cfg, kind: str) -> float | None:
    """data.image_fraction resolved for a DiT of `kind`: TI2V -> the value, or 0.5 when unset; other kinds -> None
    (setting it there is an error: it would be ignored)."""
    fraction = cfg.data.image_fraction
    if kind != "ti2v":
        if fraction is not None:
            raise ValueError(f"data.image_fraction={fraction} applies to Wan2.2 TI2V-5B teachers only (the share of "
                             f"samples that start from an image); model.path holds a {kind} model: unset it")
        return None
    return 0.5 if fraction is None else float(fraction)


def shapes_world(data) -> ShapesWorld:
    """The shapes world a config's `data` section renders (frames, size, object size range); ShapesWorld checks
    the object size range against the frame and the travel."""
    return ShapesWorld(data.num_frames, data.height, data.width, size_range=tuple(data.object_size))


def source_data(cfg, kind: str) -> tuple[list[str], ShapesWorld | None, ImagePairs | None]:
    """(prompts in source order, shapes world or None, image pairs or None) of a distillation config whose DiT
    is of `kind` (`model_kind`): I2V, and TI2V with a non-zero data.image_fraction, read prompt/image pairs."""
    fraction = image_fraction(cfg, kind)
    if cfg.data.source == "shapes":
        return list(PROMPTS), shapes_world(cfg.data), None
    if kind == "i2v" or fraction:
        try:
            pairs = load_pairs(cfg.data.prompt_path, cfg.data.prompt_column, cfg.data.image_column)
        except ValueError as e:
            if kind != "ti2v":
                raise
            raise ValueError(f"{e}. TI2V with data.image_fraction={fraction} needs prompt/image pairs; set "
                             f"data.image_fraction=0 to train on the prompts alone (text-to-video only)") from e
        return pairs.prompts, None, pairs
    return load_prompts(cfg.data.prompt_path, cfg.data.prompt_column), None, None


def source_prompts(cfg) -> list[str]:
    """The training prompts of a config in source order (what the prompt store encodes before the negative)."""
    return source_data(cfg, config_kind(cfg))[0]


def build_prompt_batches(cfg, kind: str, text_encoder, vae, image_encoder, text_len: int, seed: int,
                         device: torch.device, rank: int = 0, world_size: int = 1,
                         barrier: Callable[[], None] = lambda: None,
                         log: Callable[[str], None] = print) -> PromptBatches:
    """The distillation data of a config: prompts (and images) from `data.*`, text rows from the prompt store
    `data.text_store` (encoded first where missing, by all ranks together) or, without one, an in-memory
    cache; I2V (and TI2V) encoders moved to `device`. `kind`: the DiT's `model_kind`. Every rank must call it (the
    store encode holds barriers)."""
    from distill.encode_prompts import ensure_store, negative_prompt

    prompts, world, pairs = source_data(cfg, kind)
    fraction = image_fraction(cfg, kind)
    listed = prompts + [negative_prompt(cfg)]
    if cfg.data.text_store:
        text = ensure_store(cfg, listed, text_len, device, rank, world_size, barrier, log)
    else:
        text = TextCache(text_encoder, listed, text_len)
    if kind == "i2v" or fraction:  # the VAE (and CLIP) encode the conditioning images on the device
        vae = vae.to(device)
        image_encoder = None if image_encoder is None else image_encoder.to(device)
    return PromptBatches(prompts, text, seed, rank, world_size, vae, image_encoder, world, pairs, device, fraction,
                         i2v=kind == "i2v")

def all_prompts() -> list[str]:
    """The world's 96 prompts plus "" (the unconditional prompt for CFG dropout)."""
    return list(PROMPTS) + [""]
