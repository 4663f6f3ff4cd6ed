"""LRA Pathfinder (Tay et al. 2020, sec. 3.5; Linsley et al. 2018): are the two dots connected?

Reader: a Pathfinder release folder (e.g. `lra_release/pathfinder32/curv_baseline/`) with images
under `imgs/<n>/sample_<i>.png` and lists under `metadata/<n>.npy`. Despite their extension the
release's metadata files are text, one image a line: `imgs/<n> sample_<i>.png <?> <label> ...`
(folder, file name, then the label in the fourth field); a real .npy array of strings with the
same columns is read too, with numpy's allow_pickle=False. Images are grayscale, flattened in
raster order to size*size intensities (vocabulary 256). Split (deterministic, by sorted order of
the metadata lines): first 80% train, next 10% eval, last 10% test.

Generator: Pathfinder-style images at any size >= 32: two long curved dashed paths and short
distractor paths; two marked dots sit on the ends of one path (label 1, connected) or on one end
of each long path (label 0). Paths are smooth random walks (heading changes ~ N(0, curvature))
reflected at the borders, drawn in dashes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..attention.base import check_number, check_positive_int
from .base import ListSplit, MissingDataError, TaskData, generated_splits, majority_rate

NPY_MAGIC = b"\x93NUMPY"


def read_metadata(path: Path) -> list[list[str]]:
    """Rows of fields from one metadata file (text, or a .npy array of strings; no pickle)."""
    raw = path.read_bytes()
    if raw.startswith(NPY_MAGIC):
        array = np.load(path, allow_pickle=False)
        return [[str(v) for v in np.atleast_1d(row)] for row in np.atleast_2d(array)]
    return [line.split() for line in raw.decode("utf-8").splitlines() if line.strip()]


def read_image(path: Path) -> np.ndarray:
    from PIL import Image  # Pillow comes with matplotlib, a dependency

    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.int64)


def read_release(root: Path, seq_len: int) -> list[dict]:
    files = sorted((root / "metadata").glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
    examples = []
    for meta in files:
        for line, fields in enumerate(read_metadata(meta), start=1):
            if len(fields) < 4:
                continue
            pixels = read_image(root / fields[0] / fields[1]).reshape(-1)
            if pixels.size > seq_len:
                raise ValueError(f"seq_len: {root / fields[0] / fields[1]} has {pixels.size} "
                                 f"pixels, more than seq_len={seq_len}")
            try:
                label = int(fields[3])
            except ValueError:
                raise ValueError(f"data: {meta}, line {line}: label {fields[3]!r} is not an "
                                 f"integer") from None
            examples.append({"tokens": pixels, "label": label})
    return examples


# ------------------------------------------------------------------------------ the generator
def reflect(x: np.ndarray, size: int) -> np.ndarray:
    """Fold real coordinates into [0, size - 1] by reflecting at the borders (a triangle wave)."""
    period = 2 * (size - 1)
    x = np.mod(x, period)
    return np.where(x > size - 1, period - x, x)


def random_path(rng: np.random.Generator, size: int, length: int, curvature: float) -> np.ndarray:
    """(length, 2) float points of a smooth walk of unit steps, reflected inside the image."""
    start = rng.uniform(2, size - 3, size=2)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, curvature, size=length))
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return reflect(start + np.cumsum(steps, axis=0) - steps[0], size)


def draw(canvas: np.ndarray, points: np.ndarray, dash: int, gap: int, width: int,
         value: int = 255) -> None:
    """Draw the dashed path (points (T, 2) as row, col) `width` pixels wide."""
    keep = (np.arange(len(points)) % (dash + gap)) < dash
    rc = np.rint(points[keep]).astype(np.int64)
    size = canvas.shape[0]
    for dr in range(width):
        for dc in range(width):
            canvas[np.clip(rc[:, 0] + dr, 0, size - 1), np.clip(rc[:, 1] + dc, 0, size - 1)] = value


def draw_dot(canvas: np.ndarray, point: np.ndarray, radius: int) -> None:
    size = canvas.shape[0]
    rows, cols = np.ogrid[:size, :size]
    canvas[(rows - point[0]) ** 2 + (cols - point[1]) ** 2 <= radius ** 2] = 255


def make_scene(rng: np.random.Generator, size: int = 32, distractors: int = 2,
               curvature: float = 0.25) -> dict:
    """The geometry of one image: two long paths "a" and "b" ((T, 2) points), short
    "distractors", the two "dots" and the "label" (1 when both dots end path a)."""
    scale = size / 32
    length = int(round(rng.uniform(18, 26) * scale))
    a, b = random_path(rng, size, length, curvature), random_path(rng, size, length, curvature)
    others = [random_path(rng, size, max(2, length // 3), curvature) for _ in range(distractors)]
    label = int(rng.integers(2))
    dots = (a[0], a[-1]) if label else (a[-int(rng.integers(2))], b[-int(rng.integers(2))])
    return {"a": a, "b": b, "distractors": others, "dots": dots, "label": label, "size": size}


def render(scene: dict) -> np.ndarray:
    """(size, size) uint8: paths dashed at intensity 160, dots as discs at 255."""
    size = scene["size"]
    scale = size / 32
    dash, gap, width = max(2, round(3 * scale)), max(1, round(scale)), max(1, round(scale / 2))
    canvas = np.zeros((size, size), dtype=np.uint8)
    for path in [*scene["distractors"], scene["a"], scene["b"]]:
        draw(canvas, path, dash, gap, width, value=160)
    for dot in scene["dots"]:
        draw_dot(canvas, dot, max(1, round(scale)))
    return canvas


def make_image(rng: np.random.Generator, size: int = 32, distractors: int = 2,
               curvature: float = 0.25) -> tuple[np.ndarray, int]:
    """-> (size, size) uint8 image, label (1 = the dots are connected)."""
    scene = make_scene(rng, size, distractors, curvature)
    return render(scene), scene["label"]


def load(data: str | None, seq_len: int, seed: int, size: int | None = None,
         distractors: int = 2, curvature: float = 0.25, eval_examples: int = 1000,
         train_examples: int | None = None) -> TaskData:
    """Generated images of `size` x `size` (default: sqrt(seq_len)) when `data` is None, else
    the release folder `data` (holding imgs/ and metadata/)."""
    common = dict(name="pathfinder", model_task="classify", vocab_size=256, num_classes=2,
                  seq_len=seq_len)
    if data is not None:
        root = Path(data)
        if not (root / "metadata").is_dir() or not (root / "imgs").is_dir():
            raise MissingDataError(
                f"data: {root} has no imgs/ and metadata/ folders; pass a Pathfinder folder of the "
                f"LRA release, e.g. lra_release/pathfinder32/curv_baseline")
        examples = read_release(root, seq_len)
        if not examples:
            raise MissingDataError(f"data: {root}/metadata/*.npy lists no images")
        n = len(examples)
        a, b = int(0.8 * n), int(0.9 * n)
        side = int(round(np.sqrt(examples[0]["tokens"].size)))
        return TaskData(**common, train=ListSplit(examples[:a], seed, shuffle=True),
                        eval=ListSplit(examples[a:b] or examples[-1:]),
                        test=ListSplit(examples[b:] or examples[-1:]),
                        chance=majority_rate([e["label"] for e in examples]),
                        info={"source": str(root), "shape": [side, side]})
    size = int(np.sqrt(seq_len)) if size is None else check_positive_int("size", size)
    check_positive_int("distractors", distractors, minimum=0)
    check_number("curvature", curvature, 0.0)
    if size < 32 or size * size > seq_len:
        raise ValueError(f"size: expected an image side >= 32 with size*size <= seq_len={seq_len}, "
                         f"got {size}")

    def make(rng):
        image, label = make_image(rng, size, distractors, curvature)
        return {"tokens": image.reshape(-1).astype(np.int64), "label": label}

    splits = generated_splits(make, seed, eval_examples, train_examples)
    return TaskData(**common, train=splits["train"], eval=splits["eval"], test=splits["test"],
                    chance=0.5, info={"generated": True, "shape": [size, size]})
