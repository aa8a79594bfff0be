"""Prompt-embedding store: umT5 embeddings of a whole prompt list, computed once, in parallel, before training.

    python -m distill.encode_prompts --config configs/train/wan/t2v_14b_dmd.yaml data.prompt_path=/data/p.txt
    torchrun --nproc_per_node 8 -m distill.encode_prompts --config ...     # (or accelerate launch -m ...)

Layout of `data.text_store` (a folder):
- `chunk_000000.safetensors`, ...: prompts [c * chunk, (c + 1) * chunk) of the list, each embedding trimmed to
  its real tokens (EOS included) and concatenated: `emb` [sum L_i, dim] in the store dtype (bf16 by default) and
  `offsets` [n + 1] int64; the store key in the metadata. Written atomically, so a killed encode keeps every
  finished chunk and continues with the missing ones.
- `lengths.safetensors` (int32 [N], every prompt's token count) and `index.json` (the key and the chunk list),
  written by rank 0 once every chunk exists: a store with an index is complete.

The list is the training prompts in source order followed by the negative prompt (the teacher's CFG uncond), so
the trainer addresses rows by index. The key: a fingerprint of the encoder and tokenizer files (sizes and sampled
bytes: cheap even for umT5-XXL), `text_len`, the dtype, the chunk size and a digest of the prompt list; a store
written under another key is an error naming what differs. The trainer (`PromptStore`) keeps only each
prompt's start and length in RAM and reads a batch's rows from the chunk files when it is drawn (positional reads
of exactly those bytes); `rows()` pads a batch to `text_len`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from models.loading import write_safetensors

INDEX = "index.json"
LENGTHS = "lengths.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
                      "I32": torch.int32}
SAMPLE_BLOCKS, BLOCK_BYTES = 16, 1 << 16  # fingerprint: 16 evenly spaced 64 KiB blocks per file, plus the size


class StaleStoreError(ValueError):
    """A store written for another encoder, text_len, dtype, chunk size or prompt list."""


@dataclass(frozen=True)
class StoreKey:
    """What a store's embeddings depend on; two stores with equal keys hold the same embeddings."""

    encoder: str  # fingerprint of the encoder weights and tokenizer files
    text_len: int
    dtype: str
    chunk_size: int
    num_prompts: int  # including the negative prompt (the last row)
    prompts: str  # sha256 of the prompt list

    def differences(self, other: StoreKey) -> list[str]:
        """'field: stored X, wanted Y' for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: stored {theirs[k]!r}, wanted {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


def file_fingerprint(paths: Sequence[str | Path]) -> str:
    """sha256 over each file's name, size and 16 evenly spaced 64 KiB blocks (folders: every file inside).

    Cheap for an 11 GB umT5-XXL file (1 MiB read) and still changes with any re-export, fine-tune or dtype
    change of the weights (their bytes move); a tokenizer file is small and hashed whole in effect."""
    h = hashlib.sha256()
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"cannot fingerprint the text encoder: {p} not found")
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for pos in np.linspace(0, max(size - BLOCK_BYTES, 0), SAMPLE_BLOCKS).astype(np.int64):
                fh.seek(int(pos))
                h.update(fh.read(BLOCK_BYTES))
    return h.hexdigest()[:32]


def encoder_files(folder: str | Path) -> list[Path]:
    """The text encoder's weight file and tokenizer of a model folder (components.json, the official Wan names, or
    the diffusers `text_encoder/` and `tokenizer/` folders)."""
    from models.loading import read_components

    folder = Path(folder)
    table = read_components(folder)
    paths = [folder / table["text_encoder"]["file"]]
    if table["tokenizer"].get("path"):
        paths.append(folder / table["tokenizer"]["path"])
    if all(p.exists() for p in paths):
        return paths
    diffusers = [folder / "text_encoder", folder / "tokenizer"]
    if all(p.is_dir() for p in diffusers):
        return diffusers
    raise FileNotFoundError(f"text encoder files of {folder} not found: expected {[str(p) for p in paths]} or the "
                            f"diffusers folders text_encoder/ and tokenizer/")


def prompts_digest(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()[:32]


def make_key(fingerprint: str, prompts: Sequence[str], text_len: int, dtype: str, chunk_size: int) -> StoreKey:
    if dtype not in DTYPES:
        raise ValueError(f"store dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if chunk_size < 1 or text_len < 1:
        raise ValueError(f"chunk_size and text_len must be >= 1, got {chunk_size} / {text_len}")
    return StoreKey(fingerprint, int(text_len), dtype, int(chunk_size), len(prompts), prompts_digest(prompts))


def chunk_path(folder: Path, c: int) -> Path:
    return folder / f"chunk_{c:06d}.safetensors"


def num_chunks(key: StoreKey) -> int:
    return -(-key.num_prompts // key.chunk_size)


def _stored_key(path: Path) -> StoreKey:
    if path.suffix == ".json":
        return StoreKey(**json.loads(path.read_text())["key"])
    with safe_open(str(path), "pt") as f:
        return StoreKey(**json.loads(f.metadata()["key"]))


def check_key(folder: Path, key: StoreKey) -> bool:
    """True if `folder` holds a complete store of `key`; False if it is missing or partial with the same key.
    A store (or a finished chunk) of another key raises StaleStoreError naming the differences."""
    # a complete store: its index (written after every chunk, under the same key); else each finished chunk
    paths = [folder / INDEX] if (folder / INDEX).is_file() else sorted(folder.glob("chunk_*.safetensors"))
    for path in paths:
        if not path.is_file():
            continue
        diff = key.differences(_stored_key(path))
        if diff:
            raise StaleStoreError(f"prompt store {folder} is stale ({path.name}): {'; '.join(diff)}. Delete the "
                                  f"folder to re-encode, or point data.text_store elsewhere")
    return (folder / INDEX).is_file()


@torch.no_grad()
def encode_chunk(text_encoder, prompts: Sequence[str], text_len: int, dtype: torch.dtype,
                 micro_batch: int) -> dict[str, Tensor]:
    """{"emb": [sum L_i, dim] in `dtype` (trimmed, concatenated), "offsets": [n + 1] int64} of one chunk,
    encoded `micro_batch` prompts per forward on the encoder's device. Forwards take the prompts in order of
    length (a micro-batch pads to its longest prompt: sorting wastes less); the rows keep the list's order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    embs: list[Tensor | None] = [None] * len(prompts)
    for a in range(0, len(order), micro_batch):
        rows = order[a:a + micro_batch]
        ids, mask = text_encoder.tokenizer([prompts[i] for i in rows], text_len)
        out = text_encoder.model(ids.to(text_encoder.device), mask.to(text_encoder.device))
        for i, e, n in zip(rows, out, mask.sum(dim=1).tolist(), strict=True):
            embs[i] = e[:n].to(dtype).cpu()
    lengths = torch.tensor([0] + [len(e) for e in embs], dtype=torch.int64)
    return {"emb": torch.cat(embs), "offsets": lengths.cumsum(0)}


def encode_store(text_encoder, prompts: Sequence[str], folder: str | Path, key: StoreKey, rank: int = 0,
                 world_size: int = 1, barrier: Callable[[], None] = lambda: None, micro_batch: int = 32,
                 log: Callable[[str], None] = print) -> Path:
    """Encode the missing chunks of `prompts` (chunk c on rank c % world_size) with `text_encoder` as it is
    (its device and dtype), then (rank 0) write the index. Every rank must call it (it holds barriers).
    Returns the store folder."""
    folder = Path(folder)
    if len(prompts) != key.num_prompts or prompts_digest(prompts) != key.prompts:
        raise ValueError("encode_store: the prompts do not match the key (make_key of the same list)")
    if check_key(folder, key):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"key": json.dumps(asdict(key))}
    todo = [c for c in range(rank, num_chunks(key), world_size) if not chunk_path(folder, c).is_file()]
    for n, c in enumerate(todo):
        part = prompts[c * key.chunk_size:(c + 1) * key.chunk_size]
        write_safetensors(encode_chunk(text_encoder, part, key.text_len, DTYPES[key.dtype], micro_batch),
                          chunk_path(folder, c), metadata=meta)
        log(f"prompt store: rank {rank} wrote chunk {c} ({n + 1}/{len(todo)} of this rank)")
    barrier()
    if rank == 0:
        missing = [c for c in range(num_chunks(key)) if not chunk_path(folder, c).is_file()]
        if missing:
            raise RuntimeError(f"prompt store {folder}: chunks {missing[:5]} missing after every rank finished")
        write_lengths(folder, key)
        tmp = folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"key": asdict(key), "lengths": LENGTHS, "chunks": [
            chunk_path(folder, c).name for c in range(num_chunks(key))]}, indent=1))
        tmp.replace(folder / INDEX)
    barrier()
    return folder


def write_lengths(folder: Path, key: StoreKey) -> None:
    """`lengths.safetensors`: every prompt's token count (int32 [N]), gathered from the chunks, so that opening
    the store reads one small file instead of touching every chunk."""
    lengths = []
    for c in range(num_chunks(key)):
        with safe_open(str(chunk_path(folder, c)), "pt") as f:
            lengths.append(f.get_tensor("offsets").diff().to(torch.int32))
    write_safetensors({"lengths": torch.cat(lengths)}, folder / LENGTHS, metadata={"key": json.dumps(asdict(key))})


class SafetensorsRows:
    """Row ranges of the tensors of one safetensors file by positional reads of exactly their bytes (header parsed
    once). A memory map would instead leave every page it touched, plus the kernel's read-around, in the resident
    memory of each process reading it; here the OS page cache keeps hot data, outside any process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.entries = {k: (8 + size + v["data_offsets"][0], list(v["shape"]), SAFETENSORS_DTYPES[v["dtype"]])
                        for k, v in header.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Tensor `name`[start:stop] (rows of its first dimension), a fresh CPU tensor."""
        offset, shape, dtype = self.entries[name]
        if not 0 <= start <= stop <= shape[0]:
            raise IndexError(f"{self.path}: rows {start}:{stop} of {name} out of range (it has {shape[0]})")
        row = int(np.prod(shape[1:], dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        n = (stop - start) * row
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, n, offset + start * row)
        finally:
            os.close(fd)
        if len(data) != n:
            raise ValueError(f"{self.path} is truncated: rows {start}:{stop} of {name} need {n} bytes, "
                             f"read {len(data)}")
        return torch.frombuffer(bytearray(data), dtype=dtype).view(stop - start, *shape[1:])


class PromptStore:
    """Rows of a complete store, read from disk per batch (`SafetensorsRows`). In RAM: a start and a length per
    prompt (12 bytes) and one header per chunk file used so far."""

    def __init__(self, folder: str | Path, key: StoreKey) -> None:
        self.folder = Path(folder)
        if not check_key(self.folder, key):
            raise FileNotFoundError(f"prompt store {self.folder} is incomplete (no {INDEX}): run "
                                    f"python -m distill.encode_prompts --config <train yaml> first")
        self.key, self.text_len = key, key.text_len
        self._chunks: dict[int, SafetensorsRows] = {}  # chunk headers, read when first used
        with safe_open(str(self.folder / LENGTHS), "pt") as f:
            self.lengths = f.get_tensor("lengths").numpy()
        # start of each prompt's rows within its chunk: cumulative lengths restarting at every chunk
        first = np.cumsum(self.lengths, dtype=np.int64) - self.lengths  # global row of each prompt's first token
        self.starts = first - first[np.arange(len(first)) // key.chunk_size * key.chunk_size]
        self.dim = self._chunk(0).shape("emb")[1]
        self.negative_row = key.num_prompts - 1

    def _chunk(self, c: int) -> SafetensorsRows:
        if c not in self._chunks:
            self._chunks[c] = SafetensorsRows(chunk_path(self.folder, c))
        return self._chunks[c]

    def __len__(self) -> int:
        return self.key.num_prompts

    def embedding(self, i: int) -> Tensor:
        """Prompt i's trimmed embedding [L_i, dim] in the store dtype (one read of exactly its bytes)."""
        a = int(self.starts[i])
        return self._chunk(int(i) // self.key.chunk_size).rows("emb", a, a + int(self.lengths[i]))

    def rows(self, index: Sequence[int]) -> Tensor:
        """[B, text_len, dim] fp32: rows `index` zero-padded to text_len (what the DiT pads to anyway)."""
        out = torch.zeros(len(index), self.text_len, self.dim)
        for b, i in enumerate(index):
            e = self.embedding(int(i))[: self.text_len]
            out[b, : len(e)] = e.float()
        return out


# ---- from a training config -----------------------------------------------------------------------------------
def store_prompts(cfg) -> list[str]:
    """The store's list for a training config: the training prompts in source order, then the negative prompt."""
    from distill.data import source_prompts

    return source_prompts(cfg) + [negative_prompt(cfg)]


def negative_prompt(cfg) -> str:
    from inference.config import WAN_NEGATIVE_PROMPT

    return WAN_NEGATIVE_PROMPT if cfg.distill.negative_prompt is None else cfg.distill.negative_prompt


def config_key(cfg, prompts: Sequence[str], text_len: int) -> StoreKey:
    folder = cfg.model.components_path or cfg.model.path
    return make_key(file_fingerprint(encoder_files(folder)), prompts, text_len, cfg.data.text_store_dtype,
                    cfg.data.text_store_chunk)


def ensure_store(cfg, prompts: Sequence[str], text_len: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                 log: Callable[[str], None] = print) -> PromptStore:
    """Open `data.text_store`, encoding what is missing first (a fresh bf16 encoder on `device`, shared work
    across ranks, freed afterwards). Every rank must call it."""
    key = config_key(cfg, prompts, text_len)
    folder = Path(cfg.data.text_store)
    if not check_key(folder, key):
        from models.components import load_encoders

        dtype = DTYPES[cfg.data.text_store_dtype]
        _, encoder, _ = load_encoders(cfg.model.components_path or cfg.model.path, "t2v", text_len, dtype)
        encode_store(encoder.to(device), prompts, folder, key, rank, world_size, barrier,
                     cfg.data.text_store_micro_batch, log)
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return PromptStore(folder, key)


def text_len_of(cfg) -> int:
    """The DiT's text_len (config.json of model.path; the registry spec without one)."""
    from distill.plan import dit_config

    return int(dit_config(cfg)["text_len"])


def _distributed() -> tuple[int, int, torch.device, Callable[[], None]]:
    """(rank, world size, device, barrier) from the torchrun / accelerate environment (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return 0, 1, device, lambda: None
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device, dist.barrier


def main(argv: list[str] | None = None) -> int:
    from distill.config import load_train_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (data.*, model.*, distill.negative_prompt)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    a = p.parse_args(argv)
    cfg = load_train_config(a.config, a.overrides)
    if not cfg.data.text_store:
        p.error("the config sets no data.text_store (the store folder): add data.text_store=DIR")
    rank, world, device, barrier = _distributed()
    prompts = store_prompts(cfg)
    store = ensure_store(cfg, prompts, text_len_of(cfg), device, rank, world, barrier)
    if rank == 0:
        print(f"prompt store {store.folder}: {len(store)} prompts (negative included), "
              f"{int(store.lengths.sum())} tokens, dim {store.dim}, {cfg.data.text_store_dtype}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
