"""The images every row scores: deterministic, photo-like JPEGs (`mlflow_clip.demo_data.make_photo_jpeg`,
so decoding costs what real photos cost), written once per size into the work dir, and the same
images per request in every row."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from benchmarks.options import size_name
from mlflow_clip.demo_data import make_photo_jpeg


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
