"""Spatial tiling with linear blending (the VAE's `use_tiling_vae`): apply a function to overlapping tiles of a
[..., H, W] tensor and blend the results, so memory follows the tile size and not the frame size."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, in_mult: int,
                out_mult: int) -> Tensor:
    """fn over overlapping spatial tiles of x [..., H, W], blended: tiles of `tile` grid cells sharing `overlap`
    cells are laid on a grid of H / in_mult x W / in_mult cells (x has in_mult pixels per cell, fn's output
    out_mult); each output pixel is the weighted mean of the tiles covering it, weights ramping linearly across
    every overlap (so they sum to one there)."""
    rows = tile_spans(x.shape[-2] // in_mult, tile, overlap)
    cols = tile_spans(x.shape[-1] // in_mult, tile, overlap)
    out = total = None
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(cols):
            piece = fn(x[..., y0 * in_mult:y1 * in_mult, x0 * in_mult:x1 * in_mult])
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], rows[-1][1] * out_mult, cols[-1][1] * out_mult)
                total = piece.new_zeros(out.shape[-2:])
            w = torch.outer(blend_ramp(rows, i, out_mult), blend_ramp(cols, j, out_mult)).to(piece)
            region = (..., slice(y0 * out_mult, y1 * out_mult), slice(x0 * out_mult, x1 * out_mult))
            out[region] += piece * w
            total[region[1:]] += w
    return out / total


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of tiles of `tile` covering range(size) with neighbours sharing >= `overlap` (the last tile
    ends at `size`, so it may share more); one span when the size fits a tile."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile + 1, tile - overlap))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return [(s, s + tile) for s in starts]


def blend_ramp(spans: Sequence[tuple[int, int]], i: int, mult: int) -> Tensor:
    """Weights [len(span i) * mult] of tile i: 1 inside, rising linearly across the overlap with the previous
    tile and falling across the overlap with the next (the two ramps of an overlap sum to one)."""
    a, b = spans[i]
    n = (b - a) * mult
    w = torch.ones(n, dtype=torch.float64)
    if i > 0:
        k = (spans[i - 1][1] - a) * mult
        w[:k] = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    if i + 1 < len(spans):
        k = (b - spans[i + 1][0]) * mult
        w[n - k:] = torch.minimum(w[n - k:], (k - torch.arange(k, dtype=torch.float64) - 0.5) / k)
    return w.float()
