"""Encoded image bytes to a decoded, upright, 8-bit RGB image, within a bounded budget of work.

Decoding happens in two steps, so that every limit is checked before any pixel is decoded:
`open_encoded` first walks the file's structure (`structure.py`: refusing more than
`max_image_parts` segments, chunks, blocks, strips or tiles, and progressive JPEGs of more than
`max_jpeg_scans` scans), then reads the header (format, width, height) and refuses an image over
`max_pixels`, one whose header promises many more pixels than its image data can plausibly
hold (`max_pixels_per_byte`, for images over `ratio_free_pixels`: the 34-byte WebP or PNG that
declares 9000x9000; padding outside the image data does not count), and one whose decode is
estimated to cost more than `max_decode_ms` of CPU (`cost.py`: pixels, scans, bytes per pixel
and format). The caller then sums the pixels and estimated costs of a whole request
(`max_request_pixels`, `max_request_decode_ms`); `finish` decodes, holding its pixels' worth of a
process-wide budget (`DecodeBudget`), so that concurrent requests never hold more than a bounded
number of decoded pixels in memory at once. Decoders that read their input as they go (JPEG,
PNG, GIF, BMP, uncompressed TIFF) are fed small blocks through a reader that checks the
request's deadline on every read, so that a request past its deadline stops mid-image.

Process-wide effects of importing this module:

- Pillow's ``DecompressionBombWarning`` becomes an error for the whole process (a module-level
  ``warnings.filterwarnings``; ``warnings.catch_warnings`` is not thread-safe). The checks here
  do not depend on it: they read the pixel count from the header themselves.
- ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone. Truncated images are refused only while it is
  False (Pillow's default): do not set it to True in a process that serves this model.

    >>> opened = open_encoded(png_bytes, InputLimits())  # doctest: +SKIP
    >>> image = finish(opened)  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import io
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .cost import Cost
from .deadline import NO_DEADLINE, Deadline, DeadlineExceeded
from .errors import ImageInputError, InternalError
from .fast_jpeg import EXIF_TRANSPOSE, FastDecodeRefused, takes_fast_path
from .fast_jpeg import decode as fast_decode
from .limits import InputLimits
from .structure import TooManyParts, read_structure

# Everything Pillow may open. Any other plugin is never tried (Image.open(..., formats=...)).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
# MPO has no opener of its own: Pillow's JPEG opener returns MPO images, and naming "MPO" in
# Image.open(formats=...) raises KeyError for any non-JPEG input.
_PILLOW_OPENERS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

ARRAY_FIX = "send uint8 pixels shaped HxWx3 (RGB), HxW (gray) or HxWx4 (RGBA)"
TOO_MANY_PIXELS_FIX = (
    "downscale the image before sending (CLIP sees at most a few hundred pixels per side), "
    "or raise the model's max_pixels setting"
)
RATIO_FIX = (
    "send the image as a photo (JPEG) or downscale it before sending; or raise the model's max_pixels_per_byte setting"
)
CORRUPT_FIX = "send the complete, unmodified file (check that the upload or base64 step is intact)"
PARTS_FIX = (
    "re-save the image with a common encoder (it writes a few dozen), or raise the model's max_image_parts setting"
)
SCANS_FIX = (
    "re-save the image as a baseline JPEG or with a common encoder's progression (libjpeg writes 10 scans), "
    "or raise the model's max_jpeg_scans setting"
)
DECODE_COST_FIX = "downscale the image or send it as an 8-bit JPEG, or raise the model's max_decode_ms setting"
# Bytes handed to a decoder at a time (Pillow's default is 64 KB): the deadline is checked
# between blocks, and 4 KB of a progressive JPEG holds at most a few dozen scans.
DECODE_BLOCK = 4096

warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

_PILLOW_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB headers Pillow's BMP plugin reads
_TIFF_PREFIXES = (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00", b"II+\x00", b"MM\x00+")


@dataclass
class OpenedImage:
    """An image whose header has been read and checked, not yet decoded."""

    image: Image.Image | None  # None once `finish` has taken it
    pixels: int
    encoded_bytes: int  # 0 for decoded arrays
    array: bool = False
    decode_ms: int = 0  # the estimated CPU cost of decoding it (`cost.py`)
    data: bytes | None = None  # a baseline JPEG's bytes, for the fast decoder (`fast_jpeg.py`)


class _CheckedReader(io.BytesIO):
    """The encoded bytes as Pillow reads them; reads check the deadline set by `finish` (each
    block a decoder reads, and every 256th of the one-byte reads of Pillow's Python decoders).
    Once the header is read, no read crosses the start of a JPEG scan: libjpeg decodes a whole
    scan with the bytes it has, and a hundred refinement scans fit in one 4 KB block."""

    deadline: Deadline = NO_DEADLINE
    boundaries: tuple[int, ...] = ()
    _small_reads = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size >= 64:
            self.deadline.check("decoding an image")
        else:
            self._small_reads += 1
            if not self._small_reads & 255:
                self.deadline.check("decoding an image")
        if self.boundaries:
            at = self.tell()
            following = bisect.bisect_right(self.boundaries, at)
            if following < len(self.boundaries):
                limit = self.boundaries[following] - at
                size = limit if size is None or size < 0 else min(size, limit)
        return super().read(size)


def sniff_allowed(data: bytes) -> str | None:
    """The allowed format ``data`` starts with, mirroring the accept tests of Pillow's plugins."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in _TIFF_PREFIXES:
        return "TIFF"
    if data[:2] == b"BM" and len(data) >= 18:
        if int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
            return "BMP"
    return None


def open_encoded(data: bytes, limits: InputLimits) -> OpenedImage:
    """Read and check the header of encoded image bytes; nothing is decoded yet."""
    sniffed = sniff_allowed(data)
    if sniffed is None:  # the same test Pillow's allowed openers apply: none of them would accept
        raise ImageInputError(f"not an image ({len(data)} bytes in no supported format)")
    structure = _checked_structure(data, sniffed, limits)
    _raise_pillow_pixel_limit(limits.max_pixels)
    described = f"{sniffed}, {len(data)} bytes"
    try:
        image = Image.open(_CheckedReader(data), formats=_PILLOW_OPENERS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(_bomb_reason(described), TOO_MANY_PIXELS_FIX) from e
    except (UnidentifiedImageError, *_PILLOW_DECODE_ERRORS) as e:  # its header is unreadable
        raise ImageInputError(*_unreadable(described, e)) from e
    if image.format not in ALLOWED_FORMATS:
        raise ImageInputError(f"unsupported format {image.format}")
    check_pixel_count(image.width, image.height, limits)
    _check_ratio(image, structure.payload, limits)
    cost = Cost.of(structure, image.mode, image.width * image.height)
    if cost.ms > limits.max_decode_ms:
        raise ImageInputError(
            f"too costly to decode: about {cost.ms} ms of CPU ({cost.describe()}) > limit {limits.max_decode_ms} "
            "(max_decode_ms)",
            DECODE_COST_FIX,
        )
    image.decodermaxblock = DECODE_BLOCK
    if isinstance(image.fp, _CheckedReader):  # the header is read: from here on, a scan at a time
        image.fp.boundaries = structure.scan_offsets[1:]
    fast = data if structure.codec == "jpeg" else None  # baseline JPEGs only (`fast_jpeg.py`)
    return OpenedImage(image, image.width * image.height, len(data), decode_ms=cost.ms, data=fast)


def _checked_structure(data: bytes, sniffed: str, limits: InputLimits):
    """The file's structure, walked before Pillow reads a byte of it (`structure.py`)."""
    try:
        structure = read_structure(data, sniffed, limits.max_image_parts)
    except TooManyParts as e:
        raise ImageInputError(
            f"too many parts: more than {e.count} {e.what} (max_image_parts; {sniffed}, {len(data)} bytes)", PARTS_FIX
        ) from None
    if structure.scans > limits.max_jpeg_scans:
        raise ImageInputError(
            f"too many progressive scans: {structure.scans} > limit {limits.max_jpeg_scans} (max_jpeg_scans; "
            f"JPEG, {len(data)} bytes)",
            SCANS_FIX,
        )
    return structure


def open_array(array: np.ndarray, limits: InputLimits) -> OpenedImage:
    """A decoded uint8 array as an image (a copy: Image.fromarray shares the caller's memory)."""
    if array.dtype != np.uint8:
        raise ImageInputError(f"unsupported array dtype {array.dtype}", ARRAY_FIX)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(f"unsupported array shape {array.shape}", ARRAY_FIX)
    check_pixel_count(array.shape[1], array.shape[0], limits)
    return OpenedImage(Image.fromarray(np.ascontiguousarray(array)), array.shape[0] * array.shape[1], 0, array=True)


def finish(opened: OpenedImage, draft_size: int | None = None, deadline: Deadline = NO_DEADLINE) -> Image.Image:
    """Decode (within the process's decode budget) into a loaded, upright RGB image.

    The opened image is handed over: a request keeps its list of opened images to the end, and
    that list must not keep every decoded image (and a WebP decoder's canvases) alive with it."""
    pixels = decode_pixels(opened, draft_size, deadline)
    return to_rgb(Image.fromarray(pixels)) if isinstance(pixels, np.ndarray) else pixels


def decode_pixels(
    opened: OpenedImage, draft_size: int | None = None, deadline: Deadline = NO_DEADLINE
) -> Image.Image | np.ndarray:
    """`finish`, or, for the JPEGs the fast decoder takes (`fast_jpeg.takes_fast_path`), the same
    pixels as a uint8 array, upright: ``[H, W, 3]`` RGB, ``[H, W]`` gray (no copy into Pillow)."""
    image, opened.image = opened.image, None
    data, opened.data = opened.data, None
    if image is None:
        raise InternalError("this image was already decoded")
    if opened.array:
        rgb = to_rgb(image)
        return rgb.copy() if rgb is image else rgb
    if data is not None and takes_fast_path(image.format, image.mode, opened.decode_ms):
        deadline.check("decoding an image")
        with DECODE_BUDGET.hold(opened.pixels, deadline):
            try:
                pixels = fast_decode(data, image.mode, image.width, image.height, draft_size, _orientation(image))
            except FastDecodeRefused:  # Pillow decides: a corrupt image, or one only it reads
                pixels = None
        if pixels is not None:
            image.close()
            return pixels
    return _pillow_decode(image, opened, draft_size, deadline)


def _pillow_decode(image: Image.Image, opened: OpenedImage, draft_size: int | None, deadline: Deadline) -> Image.Image:
    if draft_size and image.format == "JPEG":
        image.draft(None, (draft_size, draft_size))  # keeps the mode; scale set by the short side
    described = f"{image.format}, {opened.encoded_bytes} bytes"
    if isinstance(image.fp, _CheckedReader):
        image.fp.deadline = deadline
    with DECODE_BUDGET.hold(opened.pixels, deadline):
        try:
            image.load()  # the first frame of animated GIF / WebP / APNG / MPO / multi-page TIFF
        except DeadlineExceeded:  # an OSError too: not a corrupt image
            image.close()
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageInputError(_bomb_reason(described), TOO_MANY_PIXELS_FIX) from e
        except _PILLOW_DECODE_ERRORS as e:
            raise ImageInputError(*_unreadable(described, e)) from e
        # Decoded pixels live in memory the image owns; a copy would cost ~5 ms for a 1080p photo.
        rgb = to_rgb(image, deadline)
        if rgb is not image:
            image.close()  # frees the decoder's own buffers now, not when the request ends
        return rgb


def check_pixel_count(width: int, height: int, limits: InputLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(f"empty image ({width}x{height} pixels)")
    if width * height > limits.max_pixels:
        raise ImageInputError(
            f"too many pixels: {width * height} ({width}x{height}) > limit {limits.max_pixels} (max_pixels)",
            TOO_MANY_PIXELS_FIX,
        )


def _check_ratio(image: Image.Image, size: int, limits: InputLimits) -> None:
    """A header that promises far more pixels than the bytes can hold: a decompression bomb."""
    pixels = image.width * image.height
    if pixels <= limits.ratio_free_pixels or pixels <= limits.max_pixels_per_byte * size:
        return
    raise ImageInputError(
        f"decompression ratio too high: {image.width}x{image.height} pixels from {size} bytes of image data "
        f"({pixels // max(size, 1)} pixels per byte) > limit {limits.max_pixels_per_byte} (max_pixels_per_byte, "
        f"for images over {limits.ratio_free_pixels} pixels)",
        RATIO_FIX,
    )


def _unreadable(described: str, error: BaseException) -> tuple[str, str]:
    """Say what is wrong when Pillow can name it; never the payload."""
    text = str(error).lower()  # Pillow 13: "Decompressed data too large"; older: "Decompressed Data Too Large"
    if "decompressed data too large" in text or "too much memory used in text chunks" in text:
        return (
            f"PNG text chunk larger than Pillow accepts ({described})",
            "send the image without its text metadata (re-save it without text chunks)",
        )
    return f"truncated or corrupt image ({described})", CORRUPT_FIX


def _raise_pillow_pixel_limit(max_pixels: int) -> None:
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb_reason(described: str) -> str:
    return f"too many pixels ({described}; over Pillow's limit of {Image.MAX_IMAGE_PIXELS})"


class DecodeBudget:
    """Decoded pixels held at once by this process's decodes: each decode waits for its share,
    so N concurrent requests hold at most `capacity` pixels in memory (4 bytes each), not N times
    their largest images. A single image larger than the capacity runs alone."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._condition = threading.Condition()

    def hold(self, pixels: int, deadline: Deadline = NO_DEADLINE) -> _Held:
        return _Held(self, min(pixels, self.capacity), deadline)

    def _acquire(self, pixels: int, deadline: Deadline) -> None:
        with self._condition:
            while self.in_use and self.in_use + pixels > self.capacity:
                deadline.check("waiting for its turn to decode an image")
                remaining = deadline.remaining()
                self._condition.wait(timeout=0.5 if remaining is None else max(0.01, min(0.5, remaining)))
            self.in_use += pixels

    def _release(self, pixels: int) -> None:
        with self._condition:
            self.in_use -= pixels
            self._condition.notify_all()


class _Held:
    def __init__(self, budget: DecodeBudget, pixels: int, deadline: Deadline):
        self.budget, self.pixels, self.deadline = budget, pixels, deadline

    def __enter__(self) -> None:
        self.budget._acquire(self.pixels, self.deadline)

    def __exit__(self, *exc) -> None:
        self.budget._release(self.pixels)


# 100 million decoded pixels (about 400 MB as RGBX) for all of a process's decodes at once.
DECODE_BUDGET = DecodeBudget(100_000_000)


def to_rgb(image: Image.Image, deadline: Deadline = NO_DEADLINE) -> Image.Image:
    """Return ``image`` upright (EXIF orientation applied) and in mode "RGB", 8 bits per channel.

    Transparency is composited over white; 16-bit and float images are scaled, not clipped. The
    input image is not modified; it is returned as is when it already is upright RGB.

        >>> to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    image.load()
    upright = _upright(image)
    deadline.check("converting an image to RGB")
    return _to_rgb_mode(upright, deadline)


def _upright(image: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose``'s pixel mapping, without its metadata rewrite (which raises on
    some corrupt EXIF blocks and is useless here)."""
    method = EXIF_TRANSPOSE.get(_orientation(image))
    return image if method is None else image.transpose(method)


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 when it has none or its EXIF is unreadable (the pixels
    are then kept as stored, as CLIP does)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _PILLOW_DECODE_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) else 1


def _to_rgb_mode(image: Image.Image, deadline: Deadline = NO_DEADLINE) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and image.has_transparency_data):
        return _composite_on_white(image, deadline)
    if mode.startswith("I"):
        return _rgb_from_16bit(image, deadline)
    if mode == "F":
        return _rgb_from_float(image, deadline)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    except ValueError as e:
        raise ImageInputError(f"unsupported image mode {mode}", "convert the image to RGB before sending") from e


def _composite_on_white(image: Image.Image, deadline: Deadline) -> Image.Image:
    if image.mode == "La":
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    deadline.check("compositing an image on white")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composite = Image.alpha_composite(white, rgba)
    del white, rgba
    deadline.check("compositing an image on white")
    return composite.convert("RGB")


_WIDE_TO_8BIT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # v / 257, rounded


def _rgb_from_16bit(image: Image.Image, deadline: Deadline = NO_DEADLINE) -> Image.Image:
    """I;16 / I;16B / I;16L / I (16-bit PNG or TIFF): value / 257, rounded (65535 -> 255)."""
    values = np.asarray(image)
    if values.dtype.itemsize > 2 or values.dtype.kind != "u":  # mode I: 32-bit signed
        values = np.clip(values, 0, 65535).astype(np.uint16)
    deadline.check("scaling a 16-bit image")
    return Image.fromarray(_WIDE_TO_8BIT[values]).convert("RGB")


def _rgb_from_float(image: Image.Image, deadline: Deadline = NO_DEADLINE) -> Image.Image:
    """F: values in 0..1 are scaled by 255; everything is then clipped to 0..255 and rounded."""
    values = np.array(image, dtype=np.float32)  # a copy of its own, changed in place below
    np.nan_to_num(values, copy=False, nan=0.0)
    if values.size and values.max() <= 1.0:
        values *= 255.0
    deadline.check("scaling a float image")
    np.clip(values, 0, 255, out=values)
    np.rint(values, out=values)
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")
