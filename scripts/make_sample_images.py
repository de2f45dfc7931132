"""Write the sample images shipped in mlflow_clip/assets/sample_images/ (torch-free).

Demo shapes of odd sizes and aspect ratios in the formats and modes the serving side must
decode (JPEG, PNG RGB / palette / RGBA / grayscale, WebP, BMP, GIF): they are the PyTorch
vs ONNX parity set and the model's input example. Every demo class appears at least once in
colour; `manifest.json` lists each file with its class (null for the grayscale image, whose
colour is gone). The output is deterministic.

    python scripts/make_sample_images.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mlflow_clip.demo_data import draw_image  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "mlflow_clip" / "assets" / "sample_images"
SEED = 20240
IMAGE_SUFFIXES = {".jpg", ".png", ".webp", ".bmp", ".gif"}


class Sample(NamedTuple):
    colour: str
    shape: str
    size: tuple[int, int]
    kind: str  # how the file is encoded, see encode()
    noise: bool = False  # noisy backgrounds compress badly: only where the file stays small


SAMPLES: tuple[Sample, ...] = (
    Sample("red", "circle", (65, 47), "jpeg", noise=True),
    Sample("red", "square", (333, 101), "png"),
    Sample("red", "triangle", (97, 401), "png-palette"),
    Sample("green", "circle", (224, 224), "jpeg"),
    Sample("green", "square", (640, 480), "jpeg"),
    Sample("green", "triangle", (120, 90), "png-rgba"),
    Sample("blue", "circle", (300, 200), "webp", noise=True),
    Sample("blue", "square", (101, 77), "bmp"),
    Sample("blue", "triangle", (150, 150), "gif"),
    Sample("blue", "square", (128, 96), "png-gray"),
    Sample("green", "circle", (37, 200), "png"),
    Sample("red", "triangle", (400, 300), "jpeg", noise=True),
)
SUFFIX = {
    "jpeg": ".jpg",
    "png": ".png",
    "png-palette": ".png",
    "png-rgba": ".png",
    "png-gray": ".png",
    "webp": ".webp",
    "bmp": ".bmp",
    "gif": ".gif",
}


def encode(image: Image.Image, kind: str, path: Path) -> None:
    """Save `image` (RGB) as `kind`."""
    if kind == "png-palette":
        image = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    elif kind == "gif":
        image = image.quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    elif kind == "png-gray":
        image = image.convert("L")
    elif kind == "png-rgba":
        # Opaque shape, half-transparent background: decoders that drop alpha and decoders
        # that composite onto white both still see a light background.
        alpha = np.where(np.asarray(image).min(axis=2) < 150, 255, 160).astype(np.uint8)
        image = image.copy()
        image.putalpha(Image.fromarray(alpha, "L"))
    options = {"jpeg": {"quality": 88}, "webp": {"quality": 80, "method": 4}}.get(kind, {})
    if kind.startswith("png"):
        options = {"optimize": True}
    image.save(path, **options)
    return image


def file_name(index: int, sample: Sample) -> str:
    width, height = sample.size
    mode = {"png-palette": "-P", "png-rgba": "-RGBA", "png-gray": "-L"}.get(sample.kind, "")
    return f"{index:02d}-{sample.colour}-{sample.shape}-{width}x{height}{mode}{SUFFIX[sample.kind]}"


def write_samples(out: Path, samples: Sequence[Sample] = SAMPLES, seed: int = SEED) -> list[dict]:
    """Write every sample and manifest.json into `out`; remove stale images; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = []
    for index, sample in enumerate(samples, start=1):
        image = draw_image(sample.colour, sample.shape, sample.size, rng, noise=sample.noise)
        path = out / file_name(index, sample)
        encode(image, sample.kind, path)
        drawn = f"a {sample.colour} {sample.shape}"
        with Image.open(path) as reread:
            fmt, mode = reread.format, reread.mode
        manifest.append(
            {
                "file": path.name,
                "class": None if sample.kind == "png-gray" else drawn,
                "drawn_as": drawn,
                "format": fmt,
                "mode": mode,
                "size": list(sample.size),
            }
        )
    keep = {entry["file"] for entry in manifest}
    for stale in out.iterdir():
        if stale.suffix.lower() in IMAGE_SUFFIXES and stale.name not in keep:
            stale.unlink()
    lines = ",\n ".join(json.dumps(entry) for entry in manifest)
    (out / "manifest.json").write_text(f"[{lines}]\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    manifest = write_samples(args.out)
    total = sum((args.out / entry["file"]).stat().st_size for entry in manifest)
    for entry in manifest:
        print(
            f"{entry['file']:40s} {entry['format']:5s} {entry['mode']:5s} "
            f"{(args.out / entry['file']).stat().st_size:>7,d} B"
        )
    print(f"{len(manifest)} images, {total / 1024:.1f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
