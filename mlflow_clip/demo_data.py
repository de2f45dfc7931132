"""Synthetic images: the embedded demo CLIP model's (3 colours x 3 shapes = 9 classes), and
photo-like JPEGs that cost what camera photos cost to decode (`make_photo_jpeg`, which
`mlflow-clip benchmark` and the benchmark harness score).

Only numpy, Pillow and the standard library, so the serving side, the examples and the
torch-free tests can import it. Every demo image shows one coloured shape on a light plain,
noisy or gradient background. Images may have any size; the shape always lies inside the
central square of side min(width, height) with a margin, so CLIP's resize + centre crop
never cuts it.

    >>> from mlflow_clip.demo_data import DEMO_CLASSES, draw_image, draw_samples
    >>> image = draw_image("red", "circle", size=(200, 120), rng=0)
    >>> image.size, image.mode
    ((200, 120), 'RGB')
    >>> samples = draw_samples(18, seed=1)
    >>> sorted(DEMO_CLASSES[label] for _, label in samples)[:2]
    ['a blue circle', 'a blue circle']
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mlflow_clip.errors import UsageError

COLOURS: tuple[str, ...] = ("red", "green", "blue")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEMO_CLASSES: tuple[str, ...] = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)
PHOTO_JPEG_QUALITY = 90

Size = tuple[int, int]
RngLike = Union[np.random.Generator, int, None]

# Base RGB of each colour; every image jitters each channel by up to +-COLOUR_JITTER.
_BASE_RGB = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (45, 75, 205)}
COLOUR_JITTER = 30
# Background channels stay within [BACKGROUND_MIN, 255]; every shape channel minimum is
# below SHAPE_MAX_MIN_CHANNEL, which tells shape pixels from background pixels.
BACKGROUND_MIN = 170
SHAPE_MAX_MIN_CHANNEL = 110
# Shape extent (diameter of its bounding circle) as a fraction of min(width, height),
# and the free margin kept around it inside the central square.
SHAPE_FRACTION = (0.25, 0.70)
MARGIN_FRACTION = 0.06
# Side range for draw_samples(sizes=None): width and height drawn independently.
VARIED_SIDE_RANGE = (48, 640)
_MAX_TILT_DEGREES = 15.0


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def draw_image(
    colour: str,
    shape: str,
    size: Size = (64, 64),
    rng: RngLike = None,
    *,
    noise: bool | None = None,
) -> Image.Image:
    """Draw one `colour` `shape` on a light background as an RGB image of `size` (w, h).

    `noise=None` picks a plain, noisy or gradient background at random; `False` forces a
    plain or gradient one (compresses well), `True` a noisy one.
    """
    if colour not in _BASE_RGB:
        raise UsageError(f"Unknown colour {colour!r}; expected one of {COLOURS}.")
    if shape not in SHAPES:
        raise UsageError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    width, height = int(size[0]), int(size[1])
    if width < 8 or height < 8:
        raise UsageError(f"Image size {size} is too small; both sides must be at least 8 pixels.")
    gen = _rng(rng)
    image = Image.fromarray(_background(width, height, gen, noise), "RGB")
    fill = tuple(
        int(v) for v in np.clip(np.add(_BASE_RGB[colour], gen.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)), 0, 255)
    )
    ImageDraw.Draw(image).polygon(_outline(shape, width, height, gen), fill=fill)
    return image


def _background(width: int, height: int, gen: np.random.Generator, noise: bool | None) -> np.ndarray:
    """A light background: plain, gradient or noise (grain of 1-4 px) around a tinted grey."""
    base = gen.uniform(200, 250) + gen.uniform(-8, 8, 3)
    kind = (
        gen.choice(["plain", "gradient", "noise"])
        if noise is None
        else ("noise" if noise else gen.choice(["plain", "gradient"]))
    )
    canvas = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == "gradient":
        angle = gen.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height)[..., None]
        canvas = canvas + gen.uniform(-30, 30) * ramp
    elif kind == "noise":
        grain = int(gen.choice([1, 2, 4]))
        small = gen.normal(0, gen.uniform(4, 14), (-(-height // grain), -(-width // grain), 3))
        canvas = canvas + np.repeat(np.repeat(small, grain, 0), grain, 1)[:height, :width].astype(np.float32)
    return np.clip(canvas, BACKGROUND_MIN, 255).astype(np.uint8)


def _outline(shape: str, width: int, height: int, gen: np.random.Generator) -> list[tuple[float, float]]:
    """Polygon of the shape, placed inside the central square with a margin."""
    side = min(width, height)
    extent = gen.uniform(*SHAPE_FRACTION) * side
    margin = MARGIN_FRACTION * side
    low_x, low_y = (width - side) / 2 + margin + extent / 2, (height - side) / 2 + margin + extent / 2
    free = side - 2 * margin - extent
    cx, cy = low_x + gen.uniform(0, free), low_y + gen.uniform(0, free)
    radius = extent / 2
    tilt = np.deg2rad(gen.uniform(-_MAX_TILT_DEGREES, _MAX_TILT_DEGREES))
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, max(24, int(radius * 2)), endpoint=False)
    elif shape == "square":
        angles = tilt + np.pi / 4 + np.arange(4) * np.pi / 2
    else:
        angles = tilt - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    # Pillow fills up to the rounded outline; stay half a pixel inside the bounding circle.
    radius = max(radius - 0.5, 1.0)
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]


def _pick_size(sizes: Size | Sequence[Size] | None, gen: np.random.Generator) -> Size:
    if sizes is None:
        low, high = VARIED_SIDE_RANGE
        return int(gen.integers(low, high + 1)), int(gen.integers(low, high + 1))
    if len(sizes) == 2 and all(isinstance(v, (int, np.integer)) for v in sizes):
        return int(sizes[0]), int(sizes[1])
    choice = sizes[int(gen.integers(len(sizes)))]
    return int(choice[0]), int(choice[1])


def draw_samples(n: int, seed: int, sizes: Size | Sequence[Size] | None = (64, 64)) -> list[tuple[Image.Image, int]]:
    """`n` images with their class index into DEMO_CLASSES, balanced and shuffled.

    `sizes` is one (w, h), a list of sizes to pick from at random, or None for widths and
    heights drawn independently from VARIED_SIDE_RANGE. The same seed gives the same images.
    """
    gen = np.random.default_rng(seed)
    labels = gen.permutation(np.arange(n) % len(DEMO_CLASSES))
    samples = []
    for label in labels:
        colour, shape = COLOURS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
        samples.append((draw_image(colour, shape, _pick_size(sizes, gen), gen), int(label)))
    return samples


def write_image_folder(
    root: str | Path,
    n_per_class: int,
    seed: int,
    size: Size | None = (64, 64),
    fmt: str = "png",
    classes: Sequence[str] | None = None,
) -> Path:
    """Write `root/<class name>/0001.<fmt>`, ... (n_per_class per class) and return root.

    `size=None` draws varied sizes; `fmt` is a Pillow-known extension (png, jpg, webp, bmp).
    `classes` keeps some of the demo classes only: their images are the ones the same seed
    draws for all nine.
    """
    unknown = sorted(set(classes or ()) - set(DEMO_CLASSES))
    if unknown:
        raise UsageError(f"Received classes {unknown}; expected some of the demo classes {list(DEMO_CLASSES)}.")
    root = Path(root)
    counts = dict.fromkeys(DEMO_CLASSES, 0)
    for image, label in draw_samples(n_per_class * len(DEMO_CLASSES), seed, size):
        name = DEMO_CLASSES[label]
        if classes and name not in classes:
            continue
        counts[name] += 1
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{counts[name]:04d}.{fmt.lower().lstrip('.')}")
    return root


def make_photo_jpeg(width: int, height: int, seed: int, quality: int = PHOTO_JPEG_QUALITY) -> bytes:
    """A photo-like JPEG: smooth colour gradients, blurred shapes, texture and sensor noise.

    About 2 bits per pixel at quality 90, like a camera photo; the same seed gives the same bytes.
    """
    rng = np.random.default_rng(seed)
    grid = rng.integers(20, 236, (int(rng.integers(3, 7)), int(rng.integers(4, 8)), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    _draw_shapes(ImageDraw.Draw(image), rng, width, height)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(0.8, min(width, height) / 900)))
    pixels = np.asarray(image, dtype=np.float32)
    coarse = rng.standard_normal((max(2, height // 6), max(2, width // 6)), dtype=np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))
    pixels += 10.0 * texture[:, :, None]
    pixels += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    pixels += 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _draw_shapes(draw, rng: np.random.Generator, width: int, height: int) -> None:
    scale = min(width, height)
    for _ in range(int(rng.integers(12, 30))):
        x, y = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.03, 0.4) * scale, rng.uniform(0.03, 0.4) * scale
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            points = [(x + rng.uniform(0, w), y + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(points, fill=colour)
