"""The sample images shipped in the package: the parity set, the input example, the smoke test.

    >>> [p.name for p in sample_image_paths()][:2]  # doctest: +SKIP
    ['01-red-circle-65x47.jpg', '02-red-square-333x101.png']
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def default_images_dir() -> Path:
    return Path(str(resources.files("mlflow_clip") / "assets" / "sample_images"))


def sample_image_paths(folder: str | Path | None = None) -> list[Path]:
    """The image files in `folder` (default: the package's samples), sorted by name."""
    folder = Path(folder) if folder else default_images_dir()
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
