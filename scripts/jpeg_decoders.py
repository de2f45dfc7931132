"""JPEG decoders side by side: Pillow as served, Pillow in one read, simplejpeg and PyTurboJPEG.

    python scripts/jpeg_decoders.py [--size 1920x1080] [--images 16] [--rounds 5] [--draft 224]

Every decoder decodes the same photo-like JPEGs (`mlflow_clip.demo_data.make_photo_jpeg`, and
the two real photographs scikit-learn ships, upscaled, when it is installed) on one thread, in
interleaved rounds; the table gives the median per image, its ratio to Pillow as served, and
whether every pixel equals Pillow's (`np.array_equal`). With `--draft N` the DCT-scaled decodes
are timed too (Pillow's draft mode against the same scale through each decoder). A last line
times two threads decoding at once, which shows whether a decoder releases the GIL.
PyTurboJPEG needs the system `libturbojpeg` (a Debian package) and is skipped without it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlflow_clip.demo_data import make_photo_jpeg  # noqa: E402
from mlflow_clip.serving import decode  # noqa: E402
from mlflow_clip.serving.limits import InputLimits  # noqa: E402


def _photos(size: tuple[int, int], count: int) -> list[bytes]:
    images = [make_photo_jpeg(size[0], size[1], seed) for seed in range(count)]
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return images
    for photo in load_sample_images().images:
        buffer = io.BytesIO()
        Image.fromarray(photo).resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
        images[len(images) % count if len(images) >= count else 0] = buffer.getvalue()
    return images


def _pillow_served(draft: int | None) -> Callable[[bytes], np.ndarray]:
    limits = InputLimits()

    def run(data: bytes) -> np.ndarray:
        return np.asarray(decode.finish(decode.open_encoded(data, limits), draft))

    return run


def _pillow_plain(draft: int | None) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        if draft:
            image.draft(None, (draft, draft))
        return np.asarray(image.convert("RGB"))

    return run


def _draft_scale(width: int, height: int, draft: int | None) -> int:
    scale = min(width // draft, height // draft) if draft else 1
    return next(a for a in (8, 4, 2, 1) if scale >= a)


def _simplejpeg(draft: int | None) -> Callable[[bytes], np.ndarray] | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def run(data: bytes) -> np.ndarray:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        a = _draft_scale(width, height, draft)
        return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // a), min_width=-(-width // a))

    return run


def _pyturbojpeg(draft: int | None) -> Callable[[bytes], np.ndarray] | None:
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        jpeg = _turbojpeg(TurboJPEG)
    except (ImportError, RuntimeError, OSError):
        return None

    def run(data: bytes) -> np.ndarray:
        width, height, _, _ = jpeg.decode_header(data)
        a = _draft_scale(width, height, draft)
        return jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, a) if a > 1 else None)

    return run


def _turbojpeg(turbojpeg: type):
    """PyTurboJPEG with the system library (Debian names it libturbojpeg.so.0 without -dev)."""
    try:
        return turbojpeg()
    except (RuntimeError, OSError):
        return turbojpeg(lib_path="/usr/lib/x86_64-linux-gnu/libturbojpeg.so.0")


def _versions() -> str:
    from PIL import features

    parts = [f"Pillow {Image.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})"]
    for name in ("simplejpeg", "turbojpeg"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _two_threads(decoder: Callable[[bytes], np.ndarray], images: list[bytes]) -> float:
    """Wall seconds per image with two threads decoding the images at once."""
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda: [decoder(d) for d in images]) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - started) / (2 * len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--draft", type=int, default=0)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    images = _photos(size, args.images)
    draft = args.draft or None
    makers = {
        "Pillow as served (4 KB reads, deadline checks)": _pillow_served,
        "Pillow, plain Image.open + convert": _pillow_plain,
        "simplejpeg": _simplejpeg,
        "PyTurboJPEG (system libturbojpeg)": _pyturbojpeg,
    }
    decoders = {name: made for name, make in makers.items() if (made := make(draft)) is not None}
    reference = [_pillow_served(draft)(data) for data in images]
    identical = {
        name: all(np.array_equal(decoder(d), r) for d, r in zip(images, reference))
        for name, decoder in decoders.items()
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, decoder in decoders.items():
            started = time.perf_counter()
            for data in images:
                decoder(data)
            times[name].append(1000 * (time.perf_counter() - started) / len(images))
    base = statistics.median(times[next(iter(decoders))])
    print(f"{len(images)} JPEGs {args.size}, {'draft ' + str(draft) if draft else 'full decode'}; {_versions()}")
    print("| decoder | ms per image (median) | × Pillow as served | identical to Pillow |")
    print("|---|---:|---:|---|")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {'yes' if identical[name] else 'NO'} |")
    for name, decoder in decoders.items():
        print(f"two threads, {name}: {1000 * _two_threads(decoder, images):.1f} ms per image (wall)")


if __name__ == "__main__":
    main()
