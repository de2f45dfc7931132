"""Exact JPEG decoding at libjpeg-turbo's own speed: simplejpeg, checked against Pillow first.

Pillow decodes JPEGs with libjpeg-turbo too, but feeds it through a Python reader (4 KB at a time
here, so that the deadline is checked between blocks) and unpacks every row into its own 4-byte
pixels. `simplejpeg` (MIT; a wheel that carries its own libjpeg-turbo, about 1 MB) decodes the
whole buffer in one call, without the GIL, into a numpy array: the same libjpeg, the same integer
IDCT and upsampling, the same pixels, in about 0.55x Pillow's time on 1080p photos
(docs/decisions/jpeg-decoder.md has the figures and why not PyTurboJPEG or a native decoder of
our own).

The same pixels are not taken on trust: `fast_jpeg_status` decodes check images made here with
both decoders, once per process (baseline 4:2:0, 4:2:2 and 4:4:4, grayscale, progressive, restart
intervals, DCT-scaled draft decodes at 1/2, 1/4 and 1/8, every EXIF orientation); one pixel
apart and Pillow decodes every image. Without simplejpeg installed, or with
``MLFLOW_CLIP_FAST_JPEG=0``, Pillow decodes them, slower, to the same pixels.

Which images take this path (`takes_fast_path`): baseline JPEGs (and MPO files, whose first
frame is one) whose pixels are RGB or gray (YCbCr, RGB and grayscale JPEGs; CMYK and YCCK go to
Pillow, whose CMYK conversion simplejpeg does not reproduce), with an estimated decode cost of
at most `FAST_MAX_MS`: the decode is one call with no deadline check inside, so costlier images
go to Pillow's 4 KB reads, which a request past its deadline stops mid-image. Progressive JPEGs
go to Pillow too, fed a scan at a time: simplejpeg decodes them no faster (libjpeg's
progressive passes are the cost). An image simplejpeg refuses (it is strict: any libjpeg
warning) is handed to Pillow, which decides whether it is corrupt, so errors are Pillow's.

Serving side: numpy, Pillow and simplejpeg only (never torch).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import FastDecodeRefused

_logger = logging.getLogger("mlflow_clip.serving.fast_jpeg")

ENV_VAR = "MLFLOW_CLIP_FAST_JPEG"
# The largest estimated decode cost (`cost.py`, Pillow's worst rates) decoded in one call: about
# 12 MP of photo, which simplejpeg decodes in about 0.1 s, well inside the longest stretch the
# deadline already allows elsewhere (docs/decisions/request-budget.md).
FAST_MAX_MS = 250
FAST_FORMATS = ("JPEG", "MPO")
FAST_MODES = ("RGB", "L")
# EXIF orientation -> the numpy view that makes the image upright (Pillow's transpositions).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: a.swapaxes(0, 1)[::-1],
}
# Pillow's way to the same upright image (what the pixels above are checked against; decode.py
# applies it to images Pillow decodes).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

try:  # optional: serving works without it, with Pillow decoding every JPEG
    import simplejpeg as _simplejpeg
except ImportError:  # not installed here
    _simplejpeg = None


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class DecoderStatus:
    """Which decoder serves JPEGs in this process, and why (for the load log and the benchmark)."""

    available: bool
    reason: str

    def describe(self) -> str:
        return ("simplejpeg" if self.available else "Pillow") + f" ({self.reason})"


def takes_fast_path(image_format: str | None, mode: str, decode_ms: int) -> bool:
    """Whether an opened image is decoded here rather than by Pillow (see the module docstring)."""
    return (
        image_format in FAST_FORMATS
        and mode in FAST_MODES
        and decode_ms <= FAST_MAX_MS
        and fast_jpeg_status().available
    )


def draft_scale(width: int, height: int, draft_size: int | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) Pillow's ``draft(None, (n, n))`` picks: the
    largest that keeps both sides at least ``draft_size``.

    >>> draft_scale(1920, 1080, 224), draft_scale(1920, 1080, None), draft_scale(500, 300, 224)
    (4, 1, 1)
    >>> draft_scale(100, 80, 224)  # smaller than the draft size: decoded in full
    1
    """
    scale = min(width // draft_size, height // draft_size) if draft_size else 1
    return next((denominator for denominator in (8, 4, 2) if scale >= denominator), 1)


def decode(data: bytes, mode: str, width: int, height: int, draft_size: int | None, orientation: int) -> np.ndarray:
    """The pixels Pillow would give for this JPEG, upright: uint8 ``[H, W, 3]`` (``[H, W]`` for a
    gray one), C-contiguous. Raises `FastDecodeRefused` for anything simplejpeg will not decode."""
    if _simplejpeg is None:
        raise FastDecodeRefused("simplejpeg is not installed")
    denominator = draft_scale(width, height, draft_size)
    try:
        pixels = _simplejpeg.decode_jpeg(
            data,
            "GRAY" if mode == "L" else "RGB",
            min_height=-(-height // denominator),
            min_width=-(-width // denominator),
        )
    except (ValueError, RuntimeError) as e:
        raise FastDecodeRefused(str(e)) from None
    expected = (-(-height // denominator), -(-width // denominator))
    if pixels.shape[:2] != expected:  # another scale than Pillow's: not the same pixels
        raise FastDecodeRefused(f"decoded {pixels.shape[:2]}, expected {expected}")
    if mode == "L":
        pixels = pixels[:, :, 0]
    return orient(pixels, orientation)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` upright for an EXIF `orientation` (1 to 8; anything else leaves them), contiguous."""
    turn = _ORIENT.get(orientation)
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))


# (width, height, Pillow save options, draft size): subsamplings, gray, restart intervals, odd
# sizes, quality 100 (the IDCT's clipping), and DCT-scaled decodes at 1/2, 1/4 and 1/8.
_CHECKS: tuple[tuple[int, int, dict, int | None], ...] = (
    (97, 61, {"quality": 90}, None),
    (61, 97, {"quality": 95, "subsampling": 0}, None),
    (66, 35, {"quality": 75, "subsampling": 1}, None),
    (50, 43, {"quality": 90, "mode": "L"}, None),
    (83, 77, {"quality": 100}, None),
    (90, 70, {"quality": 90, "restart_marker_blocks": 2}, None),
    (101, 93, {"quality": 90}, 48),
    (130, 97, {"quality": 92, "subsampling": 0}, 24),
    (171, 129, {"quality": 90}, 16),
    (64, 57, {"quality": 90, "mode": "L"}, 25),
)


@functools.cache
def fast_jpeg_status() -> DecoderStatus:
    """Check simplejpeg against the installed Pillow, once per process: every check image, full
    and DCT-scaled, and every EXIF orientation, must give identical pixels."""
    if not enabled():
        return DecoderStatus(False, f"{ENV_VAR} turns it off")
    if _simplejpeg is None:
        return DecoderStatus(False, "simplejpeg is not installed")
    rng = np.random.default_rng(20240607)
    try:
        for width, height, options, draft in _CHECKS:
            if not _matches_pillow(_check_image(rng, width, height, options), draft):
                reason = f"differs from Pillow {Image.__version__} on a {width}x{height} JPEG {options}"
                _logger.warning("mlflow-clip JPEG decoding: simplejpeg %s; Pillow decodes", reason)
                return DecoderStatus(False, reason + "; Pillow decodes")
        if not _orientations_match(rng):
            return DecoderStatus(False, "its EXIF orientations differ from Pillow's; Pillow decodes")
    except Exception as e:  # noqa: BLE001 - any failure means: Pillow decodes
        reason = f"failed its check ({type(e).__name__}: {e}); Pillow decodes"
        _logger.warning("mlflow-clip JPEG decoding: simplejpeg %s", reason)
        return DecoderStatus(False, reason)
    return DecoderStatus(
        True, f"simplejpeg {_simplejpeg.__version__}; identical to Pillow {Image.__version__} on its check images"
    )


def _check_image(rng: np.random.Generator, width: int, height: int, options: dict) -> bytes:
    """Smooth colour, hard edges and noise (the IDCT's clipping is reached)."""
    options = dict(options)
    mode = options.pop("mode", "RGB")
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    noise = rng.integers(-60, 60, (height, width, 3))
    pixels = np.clip(ramp + noise, 0, 255).astype(np.uint8)
    pixels[rng.random((height, width)) < 0.1] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _matches_pillow(data: bytes, draft: int | None) -> bool:
    image = Image.open(io.BytesIO(data))
    width, height, mode = image.width, image.height, image.mode
    if draft:
        image.draft(None, (draft, draft))
    expected = np.asarray(image)
    return bool(np.array_equal(decode(data, mode, width, height, draft, 1), expected))


def _orientations_match(rng: np.random.Generator) -> bool:
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    return all(
        np.array_equal(orient(pixels, orientation), np.asarray(image.transpose(method)))
        for orientation, method in EXIF_TRANSPOSE.items()
    )
