"""Evaluator of the shapes world: reads colour, shape, direction and validity back from uint8 frames.

    r = evaluate_video(frames, "a red circle moving left")   # frames: uint8 [F, H, W, 3]
    r["joint_correct"], r["colour"], r["shape"], r["direction"], r["valid"]
    s = evaluate_set(videos, prompts)                        # accuracies, validity rate
    d = diversity(s["results"], ground_truth_results(world, prompts, seeds))

Method (per frame, vectorised): the object mask is `max(R, G, B) > 0.35`; 8-connected components; the
largest is the object. Coverage `c = intensity / peak` (peak: 90th percentile inside the object) gives soft
extents: width = sum of the column maxima of c, height likewise, area = sum of c.
- colour: the nearest palette entry to the mean RGB of the object's core (c >= 0.8) over all frames;
- shape: the object's coverage with its holes filled (background pixels enclosed by the half-peak mask count as
  object) is compared with the anti-aliased template of each shape (circle, square, triangle) of the same area
  and centroid; the best soft IoU (sum min / sum max over all frames) wins. Area and centroid are integrals, so
  ragged edges, texture holes and a dim halo, the defects of generated objects, move them little (the box
  extents that an earlier version fitted the templates to grow with every stray pixel: it read visibly square
  generated objects as circles). The box fill ratio (circle 0.79, square 1, triangle 0.5) is reported too;
- direction: the larger axis of the least-squares centroid velocity; it must move >= 10% of the frame;
- validity: exactly one object of >= (0.08 min(H, W))^2 pixels in every frame, a clean background (<= 1% of
  the pixels outside the dilated object brighter than 0.15), object side within 10-50% of min(H, W).
Per-attribute accuracies count every video (no object -> wrong); the joint accuracy needs validity and all three.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from data.shapes import COLOURS, SHAPES, ShapesWorld, coverage, parse_prompt

OBJECT_THRESHOLD = 0.35  # intensity (max channel / 255) of an object pixel
BACKGROUND_THRESHOLD = 0.15  # intensity of a "dirty" background pixel
MAX_DIRTY = 0.01  # fraction of dirty background pixels allowed per frame
MIN_OBJECT = 0.08  # side (fraction of min(H, W)) of the smallest blob that counts as an object
SIZE_RANGE = (0.1, 0.5)  # valid object side, fraction of min(H, W)
MIN_MOVE = 0.1  # minimum displacement over the clip, fraction of the frame along the motion
INVALID_REASONS = ("objects per frame", "background not clean", "object size")  # how `reasons` entries start
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask [..., H, W] (0 = background).

    Min-label propagation over 3x3 neighbourhoods (a separable min filter) with pointer jumping (label ->
    label of that pixel), so it converges in a few sweeps. Labels are flat indices + 1, unique across leading
    dims. Only the box around the mask (over all leading dims) is processed.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.int64)
    rows, cols = np.flatnonzero(mask.any(axis=-1).reshape(-1, mask.shape[-2]).any(0)), \
        np.flatnonzero(mask.any(axis=-2).reshape(-1, mask.shape[-1]).any(0))
    if len(rows) == 0:
        return out
    box = (..., slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    m = mask[box]
    H, W = m.shape[-2:]
    n = m.size
    big = n + 1
    lab = np.where(m, np.arange(1, n + 1, dtype=np.int64).reshape(m.shape), big)
    while True:
        p = np.pad(lab, [(0, 0)] * (m.ndim - 2) + [(1, 1), (0, 0)], constant_values=big)
        new = np.minimum(np.minimum(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])
        p = np.pad(new, [(0, 0)] * (m.ndim - 2) + [(0, 0), (1, 1)], constant_values=big)
        new = np.minimum(np.minimum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
        new = np.where(m, new, big)
        new = np.append(new.ravel(), big)[new - 1]  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    out[box] = np.where(m, lab, 0)
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    H, W = mask.shape[-2:]
    p = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(r, r), (r, r)])
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[..., dy:dy + H, dx:dx + W]
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool [..., H, W]: `mask` plus the background pixels not 8-connected to the frame border (its holes)."""
    mask = np.asarray(mask, dtype=bool)
    bg = label_components(~mask)
    border = np.zeros(mask.shape, dtype=bool)
    border[..., [0, -1], :] = True
    border[..., :, [0, -1]] = True
    outside = np.isin(bg, np.unique(bg[border & ~mask]))
    return mask | ~outside


# template side from the area a: square s^2, circle pi s^2 / 4, triangle (base s, height s) s^2 / 2
_SIDE_FROM_AREA = {"square": 1.0, "circle": 2 / math.sqrt(math.pi), "triangle": math.sqrt(2.0)}


def classify_shape(c: np.ndarray, obj: np.ndarray) -> str:
    """Shape of an object from its soft coverage `c` [F, H, W] in [0, 1] and component mask `obj` [F, H, W].

    Holes of the half-peak mask are set to full coverage; each template is placed at the coverage's centroid
    (the triangle's box centre sits s/6 above its centroid) with the side that gives the coverage's area; the
    shape with the largest soft IoU sum(min(c, t)) / sum(max(c, t)) over all frames wins.
    """
    F, H, W = c.shape
    core = obj & (c >= 0.5)
    c = np.where(fill_holes(core) & ~core, 1.0, c).astype(np.float32)
    area = c.sum((1, 2))
    c, area = c[area > 0], area[area > 0]
    if len(area) == 0:
        return SHAPES[0]
    xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5
    cx, cy = (c * xs).sum((1, 2)) / area, (c * ys[:, None]).sum((1, 2)) / area
    ious = []
    for shape in SHAPES:
        side = _SIDE_FROM_AREA[shape] * np.sqrt(area)
        t = coverage(shape, cx, cy - side / 6 if shape == "triangle" else cy, side, H, W)
        ious.append(np.minimum(c, t).sum() / np.maximum(c, t).sum())
    return SHAPES[int(np.argmax(ious))]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def evaluate_video(frames: np.ndarray, prompt: str | None = None) -> dict:
    """Read a clip (uint8 [F, H, W, 3]; an image [H, W, 3] is one frame) and compare with `prompt`.

    Returns colour, shape, direction (None when not measurable), valid (+ `reasons`), n_objects (max per
    frame), dirty (max background fraction), size (side / min(H, W)), start_x/start_y (box centre of frame 0 /
    W, H), speed (frame fraction per frame along the motion), fill; with a prompt also `{attr}_correct` and
    `joint_correct`.
    """
    frames = _check_frames(frames)
    F, H, W, _ = frames.shape
    rgb = frames.astype(np.float32)
    inten, obj, n_obj = segment(frames)
    present = obj.any((1, 2))
    out: dict = {"prompt": prompt, "colour": None, "shape": None, "direction": None, "n_objects": int(n_obj.max()),
                 "size": math.nan, "start_x": math.nan, "start_y": math.nan, "speed": math.nan, "fill": math.nan}
    region = _dilate(obj, 2)  # the object and its edge
    dirty = ((inten > BACKGROUND_THRESHOLD) & ~region).sum((1, 2)) / (H * W)
    out["dirty"] = float(dirty.max())
    reasons = []
    if not present.all() or (n_obj != 1).any():
        reasons.append(f"objects per frame {sorted(set(n_obj.tolist()))} (need exactly 1)")
    if out["dirty"] > MAX_DIRTY:
        reasons.append(f"background not clean ({out['dirty']:.3f} > {MAX_DIRTY})")
    if present.any():
        _measure(out, rgb, soft_coverage(inten, obj), obj, present)
        lo, hi = SIZE_RANGE
        if not (lo <= out["size_min"] and out["size_max"] <= hi):
            reasons.append(f"object size {out['size_min']:.2f}-{out['size_max']:.2f} outside {SIZE_RANGE}")
    out["valid"] = not reasons
    out["reasons"] = reasons
    if prompt is not None:
        want = dict(zip(("colour", "shape", "direction"), parse_prompt(prompt), strict=True))
        for k, v in want.items():
            out[f"{k}_correct"] = out[k] == v
        out["joint_correct"] = out["valid"] and all(out[f"{k}_correct"] for k in want)
    return out


def segment(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [F, H, W, 3] -> intensity (max channel / 255) [F, H, W], object mask [F, H, W] (the largest
    8-connected component of intensity > OBJECT_THRESHOLD per frame) and the number of components of at least
    the minimum object area per frame [F]."""
    frames = _check_frames(frames)
    F, H, W, _ = frames.shape
    inten = frames.max(-1).astype(np.float32) / 255.0
    labels = label_components(inten > OBJECT_THRESHOLD)
    min_area = (MIN_OBJECT * min(H, W)) ** 2
    obj = np.zeros((F, H, W), dtype=bool)
    n_obj = np.zeros(F, dtype=int)
    for f in range(F):
        ids, counts = np.unique(labels[f][labels[f] > 0], return_counts=True)
        if len(ids):
            n_obj[f] = int((counts >= min_area).sum())
            obj[f] = labels[f] == ids[np.argmax(counts)]
    return inten, obj, n_obj


def soft_coverage(inten: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Soft coverage [F, H, W] in [0, 1]: intensity / peak (90th percentile inside the object), kept within 2
    pixels of the object mask (anti-aliased edges count, other blobs do not); zeros without an object."""
    if not obj.any():
        return np.zeros(obj.shape, dtype=np.float32)
    peak = float(np.percentile(inten[obj], 90))
    return np.clip(inten / max(peak, 1e-6), 0, 1) * _dilate(obj, 2)


def _measure(out: dict, rgb: np.ndarray, c: np.ndarray, obj: np.ndarray, present: np.ndarray) -> None:
    F, H, W = c.shape
    core = obj & (c >= 0.8)
    mean_rgb = rgb[core].mean(0) if core.any() else rgb[obj].mean(0)
    out["colour"] = _PALETTE_NAMES[int(np.argmin(((_PALETTE - mean_rgb) ** 2).sum(-1)))]

    c, idx = c[present], np.flatnonzero(present)
    xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5
    colmax, rowmax = c.max(1), c.max(2)  # (F', W), (F', H)
    w, h = colmax.sum(-1), rowmax.sum(-1)
    area = c.sum((1, 2))
    bx, by = (colmax * xs).sum(-1) / w, (rowmax * ys).sum(-1) / h  # box centres
    side = (w + h) / 2
    out["shape"] = classify_shape(c, obj[present])
    out["fill"] = float(np.median(area / (w * h)))
    scale = min(H, W)
    out["size"] = float(np.median(side) / scale)
    out["size_min"], out["size_max"] = float(side.min() / scale), float(side.max() / scale)
    out["start_x"], out["start_y"] = float(bx[0] / W), float(by[0] / H)
    if len(idx) < 2:
        return
    cx, cy = (c * xs).sum((1, 2)) / area, (c * ys[:, None]).sum((1, 2)) / area  # centroids
    vx, vy = np.polyfit(idx, cx, 1)[0], np.polyfit(idx, cy, 1)[0]  # pixels per frame
    if abs(vx) >= abs(vy):
        direction, speed = ("right" if vx > 0 else "left"), abs(vx) / W
    else:
        direction, speed = ("down" if vy > 0 else "up"), abs(vy) / H
    out["speed"] = float(speed)
    if speed * (F - 1) >= MIN_MOVE:
        out["direction"] = direction


def evaluate_set(videos: Iterable[np.ndarray], prompts: Sequence[str],
                 images: Sequence[np.ndarray] | None = None) -> dict:
    """Accuracies over a set: colour/shape/direction/joint accuracy, valid_rate, invalid_reasons (videos failing
    each validity rule), n and per-video `results`.

    With I2V conditioning `images`, also the mean first-frame PSNR and the identity rate (colour and shape of
    the video equal those read from the image).
    """
    results = []
    for i, (v, p) in enumerate(zip(videos, prompts, strict=True)):
        r = evaluate_video(v, p)
        if images is not None:
            r.update(i2v_metrics(v, images[i]))
        results.append(r)
    n = len(results)
    if n == 0:
        raise ValueError("evaluate_set needs at least one video")
    out = {"n": n, "valid_rate": sum(r["valid"] for r in results) / n}
    # why clips are invalid: how many videos fail each rule (a video may fail several)
    out["invalid_reasons"] = {kind: sum(any(x.startswith(kind) for x in r["reasons"]) for r in results)
                              for kind in INVALID_REASONS}
    for k in ("colour", "shape", "direction", "joint"):
        out[f"{k}_acc"] = sum(bool(r[f"{k}_correct"]) for r in results) / n
    by_shape = defaultdict(list)  # shape accuracy among the videos whose prompt names that shape
    for r, p in zip(results, prompts, strict=True):
        by_shape[parse_prompt(p)[1]].append(bool(r["shape_correct"]))
    out["shape_acc_by_prompt"] = {s: sum(by_shape[s]) / len(by_shape[s]) for s in SHAPES if by_shape[s]}
    if images is not None:
        out["first_frame_psnr"] = float(np.mean([min(r["first_frame_psnr"], 100.0) for r in results]))
        out["identity_rate"] = sum(r["identity"] for r in results) / n
    out["results"] = results
    return out


def first_frame_psnr(frames: np.ndarray, image: np.ndarray) -> float:
    """PSNR (dB, peak 255) of frame 0 against the conditioning image; inf when identical."""
    frames, image = _check_frames(frames), _check_frames(image)[0]
    if frames.shape[1:] != image.shape:
        raise ValueError(f"image {image.shape} does not match the frames {frames.shape[1:]}")
    mse = float(((frames[0].astype(np.float64) - image.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def identity(frames: np.ndarray, image: np.ndarray) -> dict:
    """Is the object of the image kept in the video? colour and shape read from both must agree."""
    img, vid = evaluate_video(image), evaluate_video(frames)
    keep_c = img["colour"] is not None and img["colour"] == vid["colour"]
    keep_s = img["shape"] is not None and img["shape"] == vid["shape"]
    return {"image_colour": img["colour"], "image_shape": img["shape"], "colour_kept": keep_c,
            "shape_kept": keep_s, "identity": keep_c and keep_s}


def i2v_metrics(frames: np.ndarray, image: np.ndarray) -> dict:
    return {"first_frame_psnr": first_frame_psnr(frames, image), **identity(frames, image)}


SPREAD_KEYS = ("start_x", "start_y", "size", "speed")


def spread(results: Sequence[dict]) -> dict[str, float]:
    """Mean over prompts of the std over seeds (valid videos only, prompts with >= 2 of them) per quantity."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if r["valid"] and r["direction"] is not None:
            groups[r["prompt"]].append(r)
    groups = {p: g for p, g in groups.items() if len(g) >= 2}
    if not groups:
        return {k: math.nan for k in SPREAD_KEYS}
    return {k: float(np.mean([np.std([r[k] for r in g]) for g in groups.values()])) for k in SPREAD_KEYS}


def diversity(results: Sequence[dict], reference: Sequence[dict]) -> dict:
    """Spread of start position, size and speed across seeds of the same prompt, relative to `reference`
    (usually `ground_truth_results` of the same prompts): `ratio_{k}` ~ 1 matches the data, ~ 0 is collapse;
    `ratio` is the mean over the quantities."""
    got, ref = spread(results), spread(reference)
    out = {f"spread_{k}": got[k] for k in SPREAD_KEYS} | {f"ref_spread_{k}": ref[k] for k in SPREAD_KEYS}
    ratios = {f"ratio_{k}": got[k] / ref[k] if ref[k] > 0 else math.nan for k in SPREAD_KEYS}
    out.update(ratios)
    out["ratio"] = float(np.mean(list(ratios.values())))
    return out


def ground_truth_results(world: ShapesWorld, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Evaluator results on the world's own renders of prompts x seeds (the reference for `diversity`)."""
    return [evaluate_video(world.render(p, s), p) for p in prompts for s in seeds]
