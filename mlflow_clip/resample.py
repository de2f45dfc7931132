"""The native resize + crop + normalize (``_mlflow_clip_resample``), checked against Pillow.

The extension computes only the pixels CLIP's center crop keeps, with Pillow's own fixed-point
arithmetic, so its output is bit-for-bit the output of ``Image.resize`` + ``Image.crop`` +
the normalization table. That equality is not taken on trust: the first use compares the two
paths on images made for the purpose (every filter, both pass orders, gray and RGB, upscaling
and downscaling) with the Pillow that is installed, and the native path is only used if every
one is identical. Otherwise, or when the extension is not built, or with
``MLFLOW_CLIP_NATIVE_RESAMPLE=0``, Pillow does the work: same pixels, about twice the time.

Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width; earlier releases always run the horizontal pass first. Which rule the
installed Pillow follows is read off a probe image, once.

Serving side: never imports torch.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

ENV_VAR = "MLFLOW_CLIP_NATIVE_RESAMPLE"
API_VERSION = 1
NATIVE_FILTERS = ("box", "bilinear", "hamming", "bicubic", "lanczos")

try:  # built by setup.py; optional, so a serving environment without a compiler still works
    import _mlflow_clip_resample as _extension  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the install
    _extension = None

_lock = threading.Lock()
_state: dict[str, Any] = {}


def vertical_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether the installed Pillow resizes ``width x height`` to ``new_width x new_height``
    with the vertical pass first (only matters when both sides change)."""
    return (
        _pillow_rule()
        and new_height < height
        and height - new_height > 2 * (width - new_width)
    )


def built() -> bool:
    """True when the extension is importable (whether or not it passed its check)."""
    return _extension is not None


def available() -> bool:
    """True when the native path is built, enabled and identical to Pillow here."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _check()
    return bool(_state["ok"])


def reason() -> str:
    """Why the native path is or is not used, for logs and the benchmark."""
    available()
    return str(_state.get("reason", ""))


def resize_crop_into(
    image: Image.Image,
    new_size: tuple[int, int],
    origin: tuple[int, int],
    size: int,
    resample: str,
    table: np.ndarray,
    out: np.ndarray,
) -> None:
    """Resize an RGB or L ``image`` to ``new_size``, crop ``size`` x ``size`` at ``origin`` and
    write the normalized float32 ``[3, size, size]`` into ``out`` (call ``available()`` first)."""
    assert _extension is not None
    channels = 1 if image.mode == "L" else 3
    pixels: Any
    try:  # Pillow's Arrow export: no copy (RGB rows are 4 bytes per pixel there)
        pixels = image.__arrow_c_array__()
        channels = 1 if channels == 1 else 4
    except (AttributeError, ValueError):  # older Pillow, or rows not contiguous (large images)
        pixels = np.asarray(image)
    new_width, new_height = new_size
    _extension.resize_crop(
        pixels,
        image.width,
        image.height,
        channels,
        new_width,
        new_height,
        origin[0],
        origin[1],
        size,
        resample,
        vertical_first(image.width, image.height, new_width, new_height),
        table,
        out,
    )


def _pillow_rule() -> bool:
    """Whether the installed Pillow picks the vertical pass first for tall reductions."""
    if "vertical_rule" not in _state:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (60, 20, 3), dtype=np.uint8))
        bicubic = Image.Resampling.BICUBIC
        both = np.asarray(image.resize((15, 5), bicubic))
        vertical = np.asarray(image.resize((20, 5), bicubic).resize((15, 5), bicubic))
        horizontal = np.asarray(image.resize((15, 60), bicubic).resize((15, 5), bicubic))
        _state["vertical_rule"] = bool(np.array_equal(both, vertical) and not np.array_equal(both, horizontal))
    return bool(_state["vertical_rule"])


# (width, height, size): downscales wide, tall (both pass orders) and square, upscales, sizes
# that keep one side, and a crop of a single pixel.
_CHECK_SHAPES = (
    (97, 61, 24),
    (61, 97, 24),
    (23, 200, 16),
    (200, 23, 16),
    (40, 40, 40),
    (40, 40, 17),
    (9, 7, 20),
    (3, 50, 11),
    (16, 30, 16),
    (5, 5, 1),
)


def _check() -> bool:
    if _extension is None:
        _state["reason"] = "the _mlflow_clip_resample extension is not built"
        return False
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = f"{ENV_VAR} turns it off"
        return False
    if getattr(_extension, "API_VERSION", None) != API_VERSION:
        _state["reason"] = f"_mlflow_clip_resample has API {getattr(_extension, 'API_VERSION', None)}, expected {API_VERSION}"
        return False
    from mlflow_clip.preprocess import Preprocessor  # the Pillow path it must equal

    rng = np.random.default_rng(20240607)
    try:
        for index, (width, height, size) in enumerate(_CHECK_SHAPES):
            for resample in NATIVE_FILTERS:
                mode = "L" if index % 3 == 2 else "RGB"
                shape = (height, width) if mode == "L" else (height, width, 3)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                pixels[rng.random(shape) < 0.3] = 255  # hard edges reach the clipping
                image = Image.fromarray(pixels, mode)
                preprocessor = Preprocessor(size, resample=resample, native=False)
                native = Preprocessor(size, resample=resample, native=True)
                expected = preprocessor(image)
                got = np.empty_like(expected)
                native._write_native(image, got)
                if not np.array_equal(expected, got):
                    _state["reason"] = (
                        f"differs from Pillow {Image.__version__} on a {width}x{height} {mode} "
                        f"image ({resample}, {size} px); using Pillow"
                    )
                    _logger.warning("mlflow-clip native resampling %s", _state["reason"])
                    return False
    except Exception as e:  # noqa: BLE001 - any failure means: use Pillow
        _state["reason"] = f"failed its check ({type(e).__name__}: {e}); using Pillow"
        _logger.warning("mlflow-clip native resampling %s", _state["reason"])
        return False
    _state["reason"] = f"identical to Pillow {Image.__version__} on its check images"
    return True
