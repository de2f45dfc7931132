"""The files shipped inside the package: sample images, CLIP's vocabulary, the demo weights.

The sample images are the parity set, the input example and each model's reference images;
the vocabulary (with CLIP's license) is copied into every model that ships a text encoder.

    >>> [p.name for p in sample_image_paths()][:2]  # doctest: +SKIP
    ['01-red-circle-65x47.jpg', '02-red-square-333x101.png']
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mlflow_clip.serving.contract import VOCAB_FILE_NAME, VOCAB_LICENSE_FILE_NAME

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEMO_WEIGHTS = "demo_clip.pt"


def assets_dir() -> Path:
    return Path(str(resources.files("mlflow_clip") / "assets"))


def default_images_dir() -> Path:
    return assets_dir() / "sample_images"


def sample_image_paths(folder: str | Path | None = None) -> list[Path]:
    """The image files in `folder` (default: the package's samples), sorted by name."""
    folder = Path(folder) if folder else default_images_dir()
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def default_vocab_path() -> Path:
    """CLIP's vocabulary as shipped with this package, the file the exporter copies into a model.

    >>> default_vocab_path().name
    'bpe_simple_vocab_16e6.txt.gz'
    """
    return assets_dir() / VOCAB_FILE_NAME


def default_vocab_license_path() -> Path:
    """CLIP's license, which must travel with every copy of the vocabulary file."""
    return assets_dir() / VOCAB_LICENSE_FILE_NAME


def demo_weights_path() -> Path:
    return assets_dir() / DEMO_WEIGHTS
