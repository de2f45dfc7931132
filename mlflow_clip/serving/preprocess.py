"""CLIP's image preprocessing in Pillow + numpy, bit-for-bit (serving side: never imports torch).

Reproduces ``clip.clip._transform(n_px)`` exactly (max abs diff 0.0): torchvision
``Resize(n_px, BICUBIC)`` on a PIL image, ``CenterCrop(n_px)``, RGB, ``ToTensor()``,
``Normalize(mean, std)``; and SigLIP's ``squash`` (both sides resized to ``n_px``, no crop:
open_clip's ``Resize((n_px, n_px))``, Hugging Face's ``SiglipImageProcessor``). The integer
arithmetic of the resize size and the crop offsets is torchvision's; the float math is float32 in
the same order, ``(x / 255 - mean) / std``, computed once per channel for the 256 possible byte
values and applied as a lookup table.

When the native extension is built and has matched the installed Pillow bit for bit
(``native_check``, run once per process), resize, crop and table run in one native pass over
only the pixels the crop keeps; otherwise Pillow and numpy do it. Both give the same float32
values.

    >>> from PIL import Image
    >>> pixels = Preprocessor(224)(Image.new("RGB", (640, 480), (255, 0, 0)))
    >>> pixels.shape, pixels.dtype
    ((3, 224, 224), dtype('float32'))
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from . import resample as native_resample
from .errors import ModelConfigError, SettingsError
from .images import to_rgb

if TYPE_CHECKING:
    from .contract import ClassifierConfig

_logger = logging.getLogger("mlflow_clip.serving.preprocess")
# The geometry: resize the short side, then crop the centre. CLIP's (torchvision's CenterCrop)
# rounds the crop offset half to even; Hugging Face's CLIPImageProcessor floors it, which moves
# the crop by one pixel when the resized side minus the crop is 3 mod 4 (a 303x224 image).
# SigLIP's squash resizes both sides to the input size (the aspect ratio is not kept) and crops
# nothing: the whole image is seen.
CENTER_CROP = "shortest_side_then_center_crop"
FLOOR_CENTER_CROP = "shortest_side_then_floor_center_crop"
SQUASH = "squash"
RESIZE_MODES = (CENTER_CROP, FLOOR_CENTER_CROP, SQUASH)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Above this many pixels, the intermediate "resize the short side, then crop" image is not built
# (CLIP would need gigabytes for a 100000x2 image): only the crop region is resampled, with
# Pillow's ``box=``, whose float coefficients can move a few pixels by one grey level. At 336 px
# exact parity holds up to aspect ratios of about 300:1, at 224 px up to about 670:1.
MAX_EXACT_RESIZED_PIXELS = 1 << 25


def compute_resized_size(width: int, height: int, size: int, resize_mode: str = CENTER_CROP) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: the short side becomes ``size``;
    with SQUASH, ``Resize((size, size))``.

    >>> compute_resized_size(640, 480, 224), compute_resized_size(640, 480, 224, SQUASH)
    ((298, 224), (224, 224))
    """
    if resize_mode == SQUASH:
        return size, size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def compute_crop_origin(width: int, height: int, size: int, resize_mode: str = CENTER_CROP) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(size)``: Python's round(), so halves go to even;
    with FLOOR_CENTER_CROP, Hugging Face's ``(side - size) // 2``; with SQUASH the resized image is
    the crop, at (0, 0).

    >>> compute_crop_origin(299, 224, 224), compute_crop_origin(301, 224, 224)
    ((38, 0), (38, 0))
    >>> compute_crop_origin(303, 224, 224), compute_crop_origin(303, 224, 224, FLOOR_CENTER_CROP)
    ((40, 0), (39, 0))
    """
    if resize_mode == FLOOR_CENTER_CROP:
        return (width - size) // 2, (height - size) // 2
    if resize_mode == SQUASH:
        return 0, 0
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


@dataclass(frozen=True)
class Preprocessor:
    """Turn PIL images into CLIP's float32 input, ``[3, R, R]`` per image, ``[N, 3, R, R]`` per batch.

    RGB and L images follow CLIP exactly. Any other mode is first made upright RGB with
    ``mlflow_clip.images.to_rgb`` (transparency over white, 16-bit scaled), which deliberately
    differs from CLIP's raw pipeline: that one resizes P and 1 images with nearest neighbour
    (Pillow's rule for those modes) and drops alpha only after resizing.

        >>> from PIL import Image
        >>> Preprocessor(64).batch([Image.new("L", (80, 64))] * 2).shape
        (2, 3, 64, 64)
    """

    input_resolution: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    resize_mode: str = CENTER_CROP
    # None: the native pass when available (mlflow_clip.resample), else Pillow. True or False
    # force one path (True still falls back for what the native pass does not cover).
    native: bool | None = None
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_resolution(self.input_resolution)
        object.__setattr__(self, "input_resolution", int(self.input_resolution))
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if any(value == 0.0 for value in self.std):
            raise SettingsError(f"Preprocessor std must not contain 0; received {self.std}.")
        if self.resample not in RESAMPLE_FILTERS:
            raise SettingsError(f"Received resample={self.resample!r}; expected one of {sorted(RESAMPLE_FILTERS)}.")
        if self.resize_mode not in RESIZE_MODES:
            raise SettingsError(f"Received resize_mode={self.resize_mode!r}; expected one of {list(RESIZE_MODES)}.")
        object.__setattr__(self, "_table", _normalization_table(self.mean, self.std))

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image as float32 ``[3, R, R]`` (a PIL image, or decoded uint8 pixels)."""
        size = self.input_resolution
        out = np.empty((3, size, size), dtype=np.float32)
        self.write(image, out)
        return out

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Several images as one float32 ``[N, 3, R, R]`` array, written in place."""
        size = self.input_resolution
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        for index, image in enumerate(images):
            self.write(image, out[index])
        return out

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The ``R x R`` RGB or L image the model sees, before normalisation."""
        if image.mode not in ("RGB", "L"):
            image = to_rgb(image)
        size = self.input_resolution
        new_width, new_height = compute_resized_size(image.width, image.height, size, self.resize_mode)
        left, top = compute_crop_origin(new_width, new_height, size, self.resize_mode)
        if new_width * new_height > MAX_EXACT_RESIZED_PIXELS:
            return self._resize_crop_region(image, new_width, new_height, left, top)
        if (new_width, new_height) != image.size:
            image = image.resize((new_width, new_height), RESAMPLE_FILTERS[self.resample])
        return image.crop((left, top, left + size, top + size))

    def _resize_crop_region(
        self, image: Image.Image, new_width: int, new_height: int, left: int, top: int
    ) -> Image.Image:
        """Resample only the crop, horizontal pass first like Pillow's full resize.

        Each call resamples one axis: a single 2-D ``box=`` call may switch Pillow to vertical
        first, and the rounding between passes then moves pixels by up to ~25 levels.
        """
        size, resample = self.input_resolution, RESAMPLE_FILTERS[self.resample]
        width, height = image.size
        if new_width >= new_height:  # wide: keep columns [left, left + size)
            scale = width / new_width
            box = (left * scale, 0.0, min(width, (left + size) * scale), float(height))
            return image.resize((size, height), resample, box=box).resize((size, size), resample)
        scale = height / new_height  # tall: keep rows [top, top + size), plus the filter's reach
        margin = 3 * max(scale, 1.0) + 2
        first = max(0, int(top * scale - margin))
        last = min(height, math.ceil((top + size) * scale + margin))
        rows = image.crop((0, first, width, last)).resize((size, last - first), resample)
        box = (0.0, top * scale - first, float(size), min(last, (top + size) * scale) - first)
        return rows.resize((size, size), resample, box=box)

    def write(self, image: Image.Image | np.ndarray, out: np.ndarray) -> None:
        """One image into ``out``, a float32 ``[3, R, R]`` view (a row of the batch the graph
        runs, so that a request's images are never copied once more to be stacked)."""
        if self.native is not False and (self.native or native_status().available):
            if self.write_native(image, out):
                return
        if isinstance(image, np.ndarray):  # decoded pixels, upright ([H, W, 3] RGB or [H, W] gray)
            image = Image.fromarray(image)
        pixels = np.asarray(self.resize_and_crop(image))
        for channel in range(3):
            plane = pixels if pixels.ndim == 2 else pixels[:, :, channel]
            np.take(self._table[channel], plane, out=out[channel], mode="clip")

    def write_native(self, image: Image.Image | np.ndarray, out: np.ndarray) -> bool:
        """Resize, crop and normalize in one native pass into ``out``; False if this image
        needs Pillow (or the extension is not installed). ``image`` may also be decoded uint8
        pixels, ``[H, W, 3]`` RGB or ``[H, W]`` gray, C-contiguous."""
        if not native_resample.built() or self.resample not in native_resample.NATIVE_FILTERS:
            return False
        if not isinstance(image, np.ndarray) and image.mode not in ("RGB", "L"):
            image = to_rgb(image)
        height, width = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
        size = self.input_resolution
        new_size = compute_resized_size(width, height, size, self.resize_mode)
        if new_size[0] * new_size[1] > MAX_EXACT_RESIZED_PIXELS:
            return False
        origin = compute_crop_origin(*new_size, size, self.resize_mode)
        native_resample.resize_crop_into(image, new_size, origin, size, self.resample, self._table, out)
        return True

    @classmethod
    def from_config(cls, config: ClassifierConfig) -> Preprocessor:
        """The preprocessing a model's contract records: size, mean, std, interpolation and
        resize mode. An interpolation or resize mode this module cannot reproduce is refused."""
        if config.resize_mode not in RESIZE_MODES:
            raise ModelConfigError(
                f"Received resize_mode={config.resize_mode!r} in the model's configuration; expected one of "
                f"{list(RESIZE_MODES)}. Load it with the mlflow-clip release that exported it."
            )
        return cls(
            input_resolution=config.input_resolution,
            mean=tuple(config.mean),
            std=tuple(config.std),
            resample=config.interpolation,
            resize_mode=config.resize_mode,
        )


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native pass is used in this process, and why (for logs and the benchmark)."""

    available: bool
    reason: str

    def describe(self) -> str:
        return ("native" if self.available else "Pillow") + f" ({self.reason})"


# (width, height, size, resize mode): downscales wide, tall (both pass orders) and square,
# upscales, sizes that keep one side, a crop of a single pixel, and squashes that shrink one side
# while growing the other.
_CHECK_SHAPES = (
    (97, 61, 24, CENTER_CROP),
    (61, 97, 24, CENTER_CROP),
    (23, 200, 16, CENTER_CROP),
    (200, 23, 16, CENTER_CROP),
    (40, 40, 40, CENTER_CROP),
    (40, 40, 17, CENTER_CROP),
    (9, 7, 20, CENTER_CROP),
    (3, 50, 11, CENTER_CROP),
    (16, 30, 16, CENTER_CROP),
    (5, 5, 1, CENTER_CROP),
    (97, 61, 24, SQUASH),
    (9, 60, 20, SQUASH),
    (60, 9, 20, SQUASH),
)


@functools.cache
def native_status() -> NativeStatus:
    """Check the native pass against the installed Pillow, once per process: every filter, both
    pass orders, gray and RGB, upscaling and downscaling must give identical floats."""
    reason = native_resample.ensure_extension()
    if reason is not None:
        return NativeStatus(False, reason + "; Pillow resizes")
    rng = np.random.default_rng(20240607)
    try:
        for index, (width, height, size, resize_mode) in enumerate(_CHECK_SHAPES):
            for resample in native_resample.NATIVE_FILTERS:
                mode = "L" if index % 3 == 2 else "RGB"
                if not _native_matches(rng, Image.new(mode, (width, height)), size, resample, resize_mode):
                    reason = (
                        f"differs from Pillow {Image.__version__} on a {width}x{height} {mode} "
                        f"image ({resample}, {size} px, {resize_mode}); Pillow resizes"
                    )
                    _logger.warning("mlflow-clip native resampling %s", reason)
                    return NativeStatus(False, reason)
    except Exception as e:  # noqa: BLE001 - any failure means: use Pillow
        reason = f"failed its check ({type(e).__name__}: {e}); Pillow resizes"
        _logger.warning("mlflow-clip native resampling %s", reason)
        return NativeStatus(False, reason)
    return NativeStatus(
        True, f"{native_resample.origin()}; identical to Pillow {Image.__version__} on its check images"
    )


def _native_matches(rng: np.random.Generator, blank: Image.Image, size: int, resample: str, resize_mode: str) -> bool:
    """Random pixels of `blank`'s mode and size, through both paths."""
    shape = (blank.height, blank.width) if blank.mode == "L" else (blank.height, blank.width, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[rng.random(shape) < 0.3] = 255  # hard edges reach the clipping
    image = Image.fromarray(pixels, blank.mode)
    expected = Preprocessor(size, resample=resample, resize_mode=resize_mode, native=False)(image)
    got = np.empty_like(expected)
    Preprocessor(size, resample=resample, resize_mode=resize_mode, native=True).write_native(image, got)
    return bool(np.array_equal(expected, got))


def _normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, 256] float32: (byte / 255 - mean) / std, each step in float32 like ToTensor + Normalize."""
    scaled = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((scaled[None, :] - mean32) / std32, dtype=np.float32)


def _check_resolution(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise SettingsError(f"Received input_resolution={value!r}; expected a positive int such as 224.")


def _three_floats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"Received {name}={values!r}; expected three numbers (R, G, B).") from e
    if len(floats) != 3:
        raise SettingsError(f"Received {name}={values!r}; expected three numbers (R, G, B).")
    return floats  # type: ignore[return-value]
