"""Does the evaluator read a generated object's shape the way a person does? A labelled check set.

    python -m benchmarks.shape_labels sheets --out benchmarks/results/shape_labels   # contact sheets to label
    python -m benchmarks.shape_labels check --labels benchmarks/results/shape_labels.json

`sheets` generates one clip per prompt (the 96 prompts, seed 0) with each config of CONFIGS (the T2V teacher at
100 NFE, whose objects are clean, and its naive 4-step sampler without CFG, whose objects are messy), shuffles
the clips with a fixed seed and writes contact sheets of numbered tiles: frame 0 and the last frame, cropped
around the object and magnified, with no prompt. A person writes one label per tile number (circle, square,
triangle, or unclear) into the labels JSON. `check` regenerates the same clips (deterministic), reads them with
the evaluator and prints the agreement with the labels (tiles labelled unclear are left out) for the
evaluator's shape rule (`data.evaluate.classify_shape`, read through `evaluate_video`) and for the rule of its
first version (the template fitted to the box extents, kept here only for this comparison), and writes
`<labels stem>_check.md`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.evaluate import evaluate_video, segment, soft_coverage
from data.shapes import PROMPTS, SHAPES, coverage, parse_prompt
from inference.loader import load_pipeline

CONFIGS = ({"config": "configs/infer/tiny/t2v_teacher.json", "overrides": {}},
           {"config": "configs/infer/tiny/t2v_teacher.json", "overrides": {"infer_steps": 4, "enable_cfg": False}})
SEED, SHUFFLE_SEED, CROP, ZOOM, COLUMNS, PER_SHEET = 0, 1234, 24, 4, 8, 48
LABELS = (*SHAPES, "unclear")


def clips() -> list[dict]:
    """The check set in tile order: {tile, config, overrides, prompt, frames uint8 [F, H, W, 3]}."""
    items = []
    for c in CONFIGS:
        pipe = load_pipeline(c["config"])
        for start in range(0, len(PROMPTS), 24):
            batch = PROMPTS[start:start + 24]
            videos = pipe.generate(batch, seed=SEED + start, **c["overrides"])
            items += [{**c, "prompt": p, "frames": v} for p, v in zip(batch, videos, strict=True)]
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(items))
    return [{**items[i], "tile": t} for t, i in enumerate(order)]


def crop(frame: np.ndarray) -> np.ndarray:
    """CROP x CROP pixels around the intensity centroid of frame [H, W, 3] (black padding)."""
    inten = frame.max(-1).astype(np.float32)
    total = inten.sum()
    H, W = inten.shape
    cy = int((inten.sum(1) * np.arange(H)).sum() / total) if total else H // 2
    cx = int((inten.sum(0) * np.arange(W)).sum() / total) if total else W // 2
    h = CROP // 2
    padded = np.pad(frame, ((h, h), (h, h), (0, 0)))
    return padded[cy:cy + CROP, cx:cx + CROP]


def write_sheets(items: list[dict], out: Path) -> list[Path]:
    """PNG contact sheets of PER_SHEET numbered tiles (frame 0 | last frame, magnified ZOOM x)."""
    paths = []
    tile_w, tile_h = 2 * CROP * ZOOM + 4, CROP * ZOOM + 16
    for s in range(0, len(items), PER_SHEET):
        chunk = items[s:s + PER_SHEET]
        rows = -(-len(chunk) // COLUMNS)
        sheet = Image.new("RGB", (COLUMNS * tile_w, rows * tile_h), (40, 40, 40))
        draw = ImageDraw.Draw(sheet)
        for k, it in enumerate(chunk):
            pair = np.concatenate([crop(it["frames"][0]), crop(it["frames"][-1])], 1)
            big = np.kron(pair, np.ones((ZOOM, ZOOM, 1), dtype=np.uint8))
            x, y = (k % COLUMNS) * tile_w, (k // COLUMNS) * tile_h
            sheet.paste(Image.fromarray(big), (x, y + 14))
            draw.text((x + 2, y + 1), str(it["tile"]), fill=(255, 255, 255))
        path = out.with_name(f"{out.name}_sheet{s // PER_SHEET}.png")
        sheet.save(path)
        paths.append(path)
    return paths


def box_template_shape(frames: np.ndarray) -> str | None:
    """The evaluator's first shape rule: the template at the box centre and side (soft extents: sums of the
    column / row maxima of the coverage) with the least L1 error over the frames."""
    inten, obj, _ = segment(frames)
    present = obj.any((1, 2))
    if not present.any():
        return None
    c = soft_coverage(inten, obj)[present]
    H, W = c.shape[1:]
    colmax, rowmax = c.max(1), c.max(2)
    w, h = colmax.sum(-1), rowmax.sum(-1)
    bx = (colmax * (np.arange(W) + 0.5)).sum(-1) / w
    by = (rowmax * (np.arange(H) + 0.5)).sum(-1) / h
    errs = [np.abs(c - coverage(s, bx, by, (w + h) / 2, H, W)).sum() for s in SHAPES]
    return SHAPES[int(np.argmin(errs))]


def check(items: list[dict], labels: dict[str, str]) -> str:
    """Markdown: agreement of both rules with the labels, overall and per config, and the labels vs prompts."""
    unknown = sorted(set(labels.values()) - set(LABELS))
    if unknown or set(labels) != {str(it["tile"]) for it in items}:
        raise ValueError(f"labels must give one of {LABELS} for every tile 0..{len(items) - 1}; unknown values "
                         f"{unknown}, missing tiles {sorted({str(it['tile']) for it in items} - set(labels))[:10]}")
    rules = {"evaluator (area + centroid template IoU)": lambda v: evaluate_video(v)["shape"],
             "first version (box template L1)": box_template_shape}
    labelled = [it for it in items if labels[str(it["tile"])] != "unclear"]
    lines = ["| rule | config | agree with the labels | (labelled tiles) |", "|---|---|---|---|"]
    confusion = {}
    for name, rule in rules.items():
        read = [(it, labels[str(it["tile"])], rule(it["frames"])) for it in labelled]  # each clip read once
        confusion[name] = Counter((want, got) for _, want, got in read)
        for c in (*CONFIGS, None):
            sel = [(want, got) for it, want, got in read
                   if c is None or (it["config"], it["overrides"]) == (c["config"], c["overrides"])]
            agree = sum(want == got for want, got in sel)
            where = "all" if c is None else c["config"] + (f":{c['overrides']}" if c["overrides"] else "")
            lines.append(f"| {name} | `{where}` | {agree / max(len(sel), 1):.1%} | {len(sel)} |")
    for name, conf in confusion.items():
        lines += ["", f"{name}, labelled (rows) vs read (columns):", "",
                  "| label | " + " | ".join(SHAPES) + " | none |", "|---|" + "---|" * (len(SHAPES) + 1)]
        for want in SHAPES:
            lines.append(f"| {want} | " + " | ".join(str(conf[(want, g)]) for g in (*SHAPES, None)) + " |")
    prompted = Counter(labels[str(it["tile"])] == parse_prompt(it["prompt"])[1] for it in items)
    unclear = sum(v == "unclear" for v in labels.values())
    lines += ["", f"Labels equal to the prompt's shape: {prompted[True]} of {len(items)} tiles ({unclear} unclear)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str | list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sheets", help="write contact sheets (PNG) to label")
    s.add_argument("--out", type=Path, required=True, help="path stem of the sheets")
    c = sub.add_parser("check", help="agreement of the evaluator with a labels JSON")
    c.add_argument("--labels", type=Path, required=True)
    args = p.parse_args(argv)
    items = clips()
    if args.cmd == "sheets":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        paths = write_sheets(items, args.out)
        print("\n".join(map(str, paths)))
        return paths
    if not args.labels.is_file():
        raise SystemExit(f"labels file not found: {args.labels}")
    table = check(items, json.loads(args.labels.read_text())["labels"])
    args.labels.with_name(args.labels.stem + "_check.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
