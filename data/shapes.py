"""The toy world: procedural text-video pairs of one solid shape moving in a straight line on black.

A prompt is `a {colour} {shape} moving {direction}` (8 colours x 3 shapes x 4 directions = 96 prompts). Start
position, size and travel distance are random; the object stays fully visible in every frame and moves a
clearly visible distance. Rendering is vectorised numpy with analytic anti-aliasing (pixel coverage), so the
motion is sub-pixel smooth. Everything is deterministic given `(prompt, seed)`.

    world = ShapesWorld()                      # 17 frames at 64x64: the tiny model's default
    video = world.render("a red circle moving left", seed=0)   # uint8 [17, 64, 64, 3]
    prompt, video = world.sample(seed=3)       # a random prompt
    ds = to_dataset(960, seed=0)               # datasets.Dataset view; ds.save_to_disk(...) materialises it

I2V: the first frame is the conditioning image (`first_frame`, `ShapesWorld.sample_i2v`) and the prompt (the
same text) names the direction. The evaluator lives in `data/evaluate.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "magenta": (220, 60, 220),
    "cyan": (50, 220, 220),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")  # triangle: pointing up
DIRECTIONS = ("left", "right", "up", "down")  # image coordinates: up = towards row 0
# Unit motion (dx, dy) in image coordinates (x = column, y = row).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

PROMPTS: list[str] = [f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS]
_PROMPT_RE = re.compile(r"^an? (\w+) (\w+) moving (\w+)$")


def make_prompt(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_prompt(text: str) -> tuple[str, str, str]:
    """`"a red circle moving left"` -> `("red", "circle", "left")` (case and extra spaces are ignored)."""
    norm = " ".join(str(text).lower().split()).rstrip(".")
    m = _PROMPT_RE.match(norm)
    if m is None:
        raise ValueError(f"not a shapes-world prompt: {text!r}; expected 'a {{colour}} {{shape}} moving "
                         f"{{direction}}', e.g. {PROMPTS[0]!r}")
    colour, shape, direction = m.groups()
    for value, known, what in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"),
                               (direction, DIRECTIONS, "direction")):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r} in prompt {text!r}; known: {list(known)}")
    return colour, shape, direction


@dataclass(frozen=True)
class ShapeParams:
    """One clip. Positions are bounding-box centres in pixels (pixel i covers [i, i+1)); `size` is the side of
    the bounding box; `speed` is pixels per frame along the direction."""

    colour: str
    shape: str
    direction: str
    size: float
    x0: float
    y0: float
    speed: float

    @property
    def prompt(self) -> str:
        return make_prompt(self.colour, self.shape, self.direction)

    def centres(self, num_frames: int) -> np.ndarray:
        """[F, 2] (x, y) bounding-box centres."""
        dx, dy = DIRECTION_VECTORS[self.direction]
        t = np.arange(num_frames, dtype=np.float64)
        return np.stack([self.x0 + dx * self.speed * t, self.y0 + dy * self.speed * t], axis=1)


def coverage(shape: str, cx: np.ndarray, cy: np.ndarray, size: float | np.ndarray, height: int,
             width: int) -> np.ndarray:
    """Anti-aliased pixel coverage in [0, 1] of `shape` centred at (cx, cy) [N] -> [N, H, W] float32."""
    cx = np.asarray(cx, dtype=np.float32).reshape(-1, 1, 1)
    cy = np.asarray(cy, dtype=np.float32).reshape(-1, 1, 1)
    half = np.asarray(size, dtype=np.float32).reshape(-1, 1, 1) / 2
    x = np.arange(width, dtype=np.float32).reshape(1, 1, -1) + 0.5 - cx  # (N, 1, W) pixel centres
    y = np.arange(height, dtype=np.float32).reshape(1, -1, 1) + 0.5 - cy  # (N, H, 1)
    if shape == "square":  # exact: product of the 1-D overlaps of pixel and box
        return np.clip(half + 0.5 - np.abs(x), 0, 1) * np.clip(half + 0.5 - np.abs(y), 0, 1)
    if shape == "circle":
        sd = np.sqrt(x * x + y * y) - half
    elif shape == "triangle":  # apex (0, -half), base corners (+-half, +half); edges have slope 2
        top = y + half
        sd = np.maximum(np.maximum((2 * x - top) / np.sqrt(5.0), (-2 * x - top) / np.sqrt(5.0)), y - half)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    return np.clip(0.5 - sd, 0, 1)


@dataclass(frozen=True)
class ShapesWorld:
    """Renders clips of `num_frames` (1 + 4k) frames at `height` x `width`.

    `size_range` is the object side as a fraction of min(height, width); `travel_range` the distance moved over
    the clip as a fraction of the frame along the motion (capped by the room left by the size and margins).
    """

    num_frames: int = 17
    height: int = 64
    width: int = 64
    size_range: tuple[float, float] = (0.2, 0.32)
    travel_range: tuple[float, float] = (0.25, 0.6)
    margin: float = 1.0  # pixels kept black between the object and the frame border

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k (e.g. 17), got {self.num_frames}")
        if min(self.height, self.width) < 16:
            raise ValueError(f"frames must be at least 16x16, got {self.height}x{self.width}")
        lo, hi = self.size_range
        if not 0 < lo <= hi or hi + self.travel_range[0] > 1 - 2 * self.margin / min(self.height, self.width):
            raise ValueError(f"size_range {self.size_range} and travel_range {self.travel_range} do not fit a "
                             f"{self.height}x{self.width} frame")

    def params(self, prompt: str, seed: int) -> ShapeParams:
        """Random size, start and speed of `prompt` for `seed` (deterministic)."""
        colour, shape, direction = parse_prompt(prompt)
        rng = np.random.default_rng([int(seed), PROMPTS.index(make_prompt(colour, shape, direction))])
        size = rng.uniform(*self.size_range) * min(self.height, self.width)
        dx, dy = DIRECTION_VECTORS[direction]
        along = self.width if dx else self.height  # frame length along the motion
        room = along - size - 2 * self.margin  # distance the centre may travel
        travel = min(rng.uniform(*self.travel_range) * along, room)
        lo_x, hi_x = self.margin + size / 2, self.width - self.margin - size / 2
        lo_y, hi_y = self.margin + size / 2, self.height - self.margin - size / 2
        # start so that the end stays inside: the free slack is room - travel (>= 0; max() absorbs rounding when
        # the travel is capped at the room)
        if dx:
            start = rng.uniform(lo_x, max(hi_x - travel, lo_x))
            x0 = start if dx > 0 else lo_x + hi_x - start
            y0 = rng.uniform(lo_y, hi_y)
        else:
            x0 = rng.uniform(lo_x, hi_x)
            start = rng.uniform(lo_y, max(hi_y - travel, lo_y))
            y0 = start if dy > 0 else lo_y + hi_y - start
        speed = travel / max(self.num_frames - 1, 1)
        return ShapeParams(colour, shape, direction, float(size), float(x0), float(y0), float(speed))

    def render_params(self, p: ShapeParams) -> np.ndarray:
        """uint8 [F, H, W, 3]."""
        c = p.centres(self.num_frames)
        cov = coverage(p.shape, c[:, 0], c[:, 1], p.size, self.height, self.width)  # (F, H, W)
        rgb = np.asarray(COLOURS[p.colour], dtype=np.float32)
        return np.rint(cov[..., None] * rgb).astype(np.uint8)

    def render(self, prompt: str, seed: int) -> np.ndarray:
        """uint8 [F, H, W, 3] video of `prompt` for `seed`."""
        return self.render_params(self.params(prompt, seed))

    def sample_prompt(self, seed: int) -> str:
        """The random prompt of `sample(seed)`, without rendering the video."""
        return PROMPTS[int(np.random.default_rng([int(seed), 1 << 20]).integers(len(PROMPTS)))]

    def sample(self, seed: int) -> tuple[str, np.ndarray]:
        """A random prompt and its video (deterministic given `seed`)."""
        prompt = self.sample_prompt(seed)
        return prompt, self.render(prompt, seed)

    def sample_i2v(self, seed: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(prompt, conditioning image [H, W, 3], video [F, H, W, 3]); the image is the video's first frame."""
        prompt, video = self.sample(seed)
        return prompt, first_frame(video), video


def first_frame(video: np.ndarray) -> np.ndarray:
    """The I2V conditioning image of a video: frame 0, uint8 [H, W, 3]."""
    if video.ndim != 4:
        raise ValueError(f"expected a video [F, H, W, 3], got shape {video.shape}")
    return np.ascontiguousarray(video[0])


def row_seed(seed: int, index: int) -> int:
    """Render seed of row `index` of a data set drawn with `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def iter_rows(n: int, seed: int = 0, world: ShapesWorld | None = None,
              prompts: Sequence[str] | None = None, with_video: bool = True) -> Iterator[dict]:
    """Rows of `to_dataset`: prompts cycle through `prompts` (default all 96, balanced)."""
    world = world or ShapesWorld()
    prompts = list(prompts or PROMPTS)
    for i in range(n):
        p = world.params(prompts[i % len(prompts)], row_seed(seed, i))
        row = {"prompt": p.prompt, "seed": row_seed(seed, i), **asdict(p)}
        if with_video:
            row["video"] = world.render_params(p)
        yield row


def to_dataset(n: int, seed: int = 0, world: ShapesWorld | None = None, prompts: Sequence[str] | None = None,
               with_video: bool = True, cache_dir: str | None = None):
    """A `datasets.Dataset` of `n` clips (generated on the fly; `.save_to_disk(path)` materialises it).

    Columns: prompt, seed, colour, shape, direction, size, x0, y0, speed and `video` (uint8 [F, H, W, 3]; read
    it with `as_numpy(ds)`). `world.render(row["prompt"], row["seed"])` reproduces a row's video.
    """
    import datasets

    world = world or ShapesWorld()
    feats = {"prompt": datasets.Value("string"), "seed": datasets.Value("int64"),
             **{k: datasets.Value("string") for k in ("colour", "shape", "direction")},
             **{k: datasets.Value("float64") for k in ("size", "x0", "y0", "speed")}}
    if with_video:
        shape = (world.num_frames, world.height, world.width, 3)
        feats["video"] = datasets.Array4D(shape=shape, dtype="uint8")
    return datasets.Dataset.from_generator(
        iter_rows, features=datasets.Features(feats), cache_dir=cache_dir,
        gen_kwargs=dict(n=n, seed=seed, world=world, prompts=list(prompts) if prompts else None,
                        with_video=with_video))


def as_numpy(ds):
    """numpy view of a `to_dataset` table with `video` kept uint8 (the plain numpy/torch formatters widen
    integer arrays to int64)."""
    return ds.with_format("numpy", columns=["video"], dtype=np.uint8, output_all_columns=True)


def write_prompt_file(path: str | Path, prompts: Sequence[str] | None = None) -> Path:
    """One prompt per line (default: all 96)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\n" for p in (prompts or PROMPTS)))
    return path


def read_prompt_file(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def write_prompt_folder(folder: str | Path, prompts: Sequence[str] | None = None) -> Path:
    """One `NNN_a_red_circle_moving_left.txt` per prompt (sorted names keep the order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(prompts or PROMPTS):
        (folder / f"{i:03d}_{p.replace(' ', '_')}.txt").write_text(p + "\n")
    return folder


def read_prompt_folder(folder: str | Path) -> list[str]:
    return [f.read_text().strip() for f in sorted(Path(folder).glob("*.txt"))]
