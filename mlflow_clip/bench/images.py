"""The images every row scores: deterministic, photo-like JPEGs (so decoding costs what real
photos cost), written once per size into the work dir, and the same images per request in every row."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_clip.bench.options import size_name

JPEG_QUALITY = 90


def make_photo_jpeg(width: int, height: int, seed: int, quality: int = JPEG_QUALITY) -> bytes:
    """A photo-like JPEG: smooth colour gradients, blurred shapes, texture and sensor noise.

    About 2 bits per pixel at quality 90, like a camera photo; the same seed gives the same bytes.
    """
    from PIL import Image, ImageDraw, ImageFilter

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


def ensure_images(work_dir: Path, size: tuple[int, int], count: int) -> list[Path]:
    """The image pool for one size, written once: `count` JPEGs, seeds 0..count-1."""
    folder = work_dir / "images" / size_name(size)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"{seed:03d}.jpg"
        if not path.exists():
            partial = path.with_suffix(".part")
            partial.write_bytes(make_photo_jpeg(size[0], size[1], seed))
            partial.replace(path)
        paths.append(path)
    return paths


def request_images(pool: Sequence[Any], batch: int, index: int) -> list[Any]:
    """The images of request `index`: the pool, cyclically, `batch` at a time (same for every row)."""
    return [pool[(index * batch + j) % len(pool)] for j in range(batch)]


def read_pool(spec: dict[str, Any]) -> list[bytes]:
    """The encoded bytes of a child task's image pool (`spec["images"]`: paths)."""
    return [Path(p).read_bytes() for p in spec["images"]]
