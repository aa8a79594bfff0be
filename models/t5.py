"""umT5 text encoder of Wan2.1 (encoder half of umT5-XXL), its tokenizers and the prompt -> embedding wrapper.

`UMT5Encoder` keeps the official key names of `models_t5_umt5-xxl-enc-bf16.pth` (docs/wan_architecture.md, "umT5-XXL
encoder"): T5 blocks with RMS pre-norm, unscaled attention with a relative position bias of its own in every
layer (bidirectional buckets, max distance 128), and a gated GELU-tanh FFN; no biases anywhere. It maps 1:1
onto transformers' `UMT5EncoderModel` (see tests/test_text_image_encoders.py for the key table).

`HFTokenizer` reads the `google/umt5-xxl` tokenizer.json from a local folder; `ByteTokenizer` is a
vocabulary-free stand-in for tiny models (UTF-8 bytes). `TextEncoder.encode(prompts)` returns one [L_i, dim]
tensor per prompt, trimmed to the real tokens including EOS, as Wan's `T5EncoderModel.__call__` does; the DiT
pads them back to text_len with zeros.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------
# network


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * weight (no mean subtraction, no bias), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """Learned bias per (relative-position bucket, head); `embedding.weight` is [num_buckets, num_heads]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """buckets [Lq, Lk] long -> bias [1, heads, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> Tensor:
    """Bidirectional T5 buckets of (key position - query position): [length, length] long.

    Half of the buckets per direction are exact offsets, the other half log-spaced up to `max_distance`.
    """
    rel = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class T5Attention(nn.Module):
    """Multi-head self-attention without scaling (T5 folds it into the init) and without biases."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, C]; bias [B, heads, L, L] additive (relative positions + padding mask)."""
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, n, L, d)
        return self.o(out.transpose(1, 2).reshape(b, l, -1))


class GatedFFN(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its weight is `gate.0.weight` as in Wan."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: Tensor) -> Tensor:
    """Keep fp16 activations finite (T5 residuals grow large), as Wan does."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int, eps: float,
                 max_distance: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = RMSNorm(dim, eps)
        self.ffn = GatedFFN(dim, dim_ffn)
        self.pos_embedding = RelativePositionBias(num_buckets, num_heads, max_distance)

    def forward(self, x: Tensor, buckets: Tensor, mask_bias: Tensor) -> Tensor:
        bias = self.pos_embedding(buckets).float() + mask_bias  # (B, n, L, L)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder with Wan's key names. Defaults are umT5-XXL (5.68B parameters)."""

    def __init__(self, vocab_size: int = 256384, dim: int = 4096, dim_attn: int = 4096, dim_ffn: int = 10240,
                 num_heads: int = 64, num_layers: int = 24, num_buckets: int = 32, eps: float = 1e-6,
                 max_distance: int = 128) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(vocab_size=vocab_size, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn,
                                           num_heads=num_heads, num_layers=num_layers,
                                           num_buckets=num_buckets, eps=eps, max_distance=max_distance)
        self.dim, self.num_heads = dim, num_heads
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets, eps, max_distance)
                                    for _ in range(num_layers))
        self.norm = RMSNorm(dim, eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's T5 init (a frozen random encoder for tiny models; real weights are always loaded)."""
        cfg = self.config
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.q.weight, std=(cfg["dim"] * cfg["dim_attn"]) ** -0.5)
            nn.init.normal_(blk.attn.k.weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(blk.attn.v.weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(blk.attn.o.weight, std=(cfg["num_heads"] * cfg["dim_attn"]) ** -0.5)
            nn.init.normal_(blk.ffn.gate[0].weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(blk.ffn.fc1.weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(blk.ffn.fc2.weight, std=cfg["dim_ffn"] ** -0.5)
            nn.init.normal_(blk.pos_embedding.embedding.weight,
                            std=(2 * cfg["num_buckets"] * cfg["num_heads"]) ** -0.5)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L] long, mask [B, L] (1 = token, 0 = padding) -> hidden states [B, L, dim] in fp32."""
        b, l = ids.shape
        x = self.token_embedding(ids)  # (B, L, C)
        buckets = relative_position_buckets(l, self.num_buckets, self.max_distance, ids.device)
        mask_bias = torch.zeros(b, 1, 1, l, device=ids.device)
        if mask is not None:
            mask_bias = mask_bias.masked_fill(mask.view(b, 1, 1, l) == 0, torch.finfo(torch.float32).min)
        for block in self.blocks:
            x = block(x, buckets, mask_bias)
        return self.norm(x).float()


# ----------------------------------------------------------------------------------------------------
# tokenizers

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def clean_text(text: str) -> str:
    """Wan's prompt cleaning: html-unescape twice, collapse whitespace, strip.

    Wan also runs ftfy.fix_text; ftfy is not a dependency, so only its cheap, common parts are done here
    (NFC normalisation and straightening curly quotes). Mojibake is not repaired.
    """
    text = unicodedata.normalize("NFC", text).translate(_QUOTES)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _pack(seqs: list[list[int]], max_len: int, eos: int, pad: int, pad_to_max: bool) -> tuple[Tensor, Tensor]:
    """Truncate each id list to max_len - 1, append EOS, pad -> (ids [B, L], mask [B, L]) long."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    seqs = [s[: max_len - 1] + [eos] for s in seqs]
    length = max_len if pad_to_max else max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ids 0/1/2 are pad/eos/unk as in T5. Needs no vocabulary file."""

    pad_id, eos_id, unk_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in clean_text(text).encode("utf-8")]

    def __call__(self, texts: Sequence[str], max_len: int, pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
        """texts -> (ids, mask) [B, L] long; EOS appended, truncated to max_len (EOS kept last), padded with 0
        to the longest sequence (or to max_len with `pad_to_max`)."""
        return _pack([self.encode(t) for t in texts], max_len, self.eos_id, self.pad_id, pad_to_max)


def word_tokenizer(words: Sequence[str]):
    """A word-level `tokenizers.Tokenizer` over `words` (lower-cased, split on whitespace and punctuation).

    The tiny models' stand-in for umT5's SentencePiece vocabulary, in which every common word is one token:
    ids 0/1/2 are <pad>/</s>/<unk> as in T5, then the words in sorted order; unknown words map to <unk>.
    Saved as tokenizer.json it loads through `HFTokenizer`, the real umT5 tokenizer path.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


class HFTokenizer:
    """The umT5 tokenizer from a local folder's `tokenizer.json` (via `tokenizers`; never online)."""

    FILE = "tokenizer.json"

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / self.FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {path} does not exist. Expected a local tokenizer folder such as the "
                f"`google/umt5-xxl` folder of a Wan2.1 checkpoint, containing {self.FILE} (and usually "
                f"special_tokens_map.json, tokenizer_config.json, spiece.model); nothing is downloaded")
        self.folder = folder
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        special = self._special_tokens(folder)
        self.eos_id = self._token_id(special.get("eos_token", "</s>"))
        self.pad_id = self._token_id(special.get("pad_token", "<pad>"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _special_tokens(folder: Path) -> dict[str, str]:
        path = folder / "special_tokens_map.json"
        if not path.is_file():
            return {}
        table = json.loads(path.read_text())
        return {k: (v["content"] if isinstance(v, dict) else v)
                for k, v in table.items() if k.endswith("_token")}

    def _token_id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"{self.folder / self.FILE} has no token {token!r}")
        return idx

    def __call__(self, texts: Sequence[str], max_len: int, pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
        """texts -> (ids, mask) [B, L] long; EOS appended, truncated to max_len (EOS kept last)."""
        encs = self.tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        return _pack([e.ids for e in encs], max_len, self.eos_id, self.pad_id, pad_to_max)


# ----------------------------------------------------------------------------------------------------
# prompt -> embeddings


class TextEncoder:
    """Prompts -> umT5 embeddings [L_i, dim] (real tokens incl. EOS), with a small LRU cache per prompt."""

    def __init__(self, model: UMT5Encoder, tokenizer, text_len: int = 512, cache_size: int = 64) -> None:
        self.model, self.tokenizer, self.text_len = model, tokenizer, text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def to(self, *args, **kwargs) -> TextEncoder:
        self.model.to(*args, **kwargs)
        self._cache.clear()
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        """One fp32 [L_i, dim] tensor per prompt, on the model's device; new prompts share one forward.

        The returned tensors are shared with the cache: treat them as read-only.
        """
        prompts = list(prompts)
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            ids, mask = self.tokenizer(todo, self.text_len)
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = self.model(ids, mask)  # (B, L, dim) fp32
            for p, emb, n in zip(todo, out, mask.sum(dim=1).tolist(), strict=True):
                self._cache[p] = emb[:n].clone()
        result = []
        for p in prompts:
            self._cache.move_to_end(p)
            result.append(self._cache[p])
        while len(self._cache) > max(self.cache_size, len(set(prompts))):
            self._cache.popitem(last=False)
        return result
