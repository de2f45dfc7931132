"""Turn one request cell into a decoded, upright, 8-bit RGB PIL image.

Serving side: numpy, Pillow and the standard library only (never torch).

``decode_image`` accepts raw encoded bytes (JPEG, PNG, WebP, BMP, GIF, TIFF, MPO), the same bytes as
base64 text (``str`` or ``bytes``; standard or urlsafe alphabet, padding optional, line breaks
allowed), ``data:image/...;base64,...`` URIs, and decoded uint8 numpy arrays. It never opens a path
or a URL, never lets Pillow try a format outside the allow-list (EPS would run Ghostscript), and
refuses oversized input before decoding it. Error messages never repeat the payload.

    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGBA", (4, 3), (255, 0, 0, 0)).save(buffer, "PNG")
    >>> image = decode_image(buffer.getvalue())
    >>> image.mode, image.size, image.getpixel((0, 0))
    ('RGB', (4, 3), (255, 255, 255))

Process-wide effects of importing this module:

- Pillow's ``DecompressionBombWarning`` becomes an error for the whole process (a module-level
  ``warnings.filterwarnings``; ``warnings.catch_warnings`` is not thread-safe). ``decode_image``
  does not depend on it: it checks the pixel count from the header itself, before decoding.
- ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone. Truncated images are refused only while it is
  False (Pillow's default): do not set it to True in a process that serves this model.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
import zlib

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import MlflowClipError
from .limits import DEFAULT_LIMITS, InputLimits

# Everything Pillow may open. Any other plugin is never tried (Image.open(..., formats=...)).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
# MPO has no opener of its own: Pillow's JPEG opener returns MPO images, and naming "MPO" in
# Image.open(formats=...) raises KeyError for any non-JPEG input.
_PILLOW_OPENERS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

SEND_IMAGE_FIX = (
    "send the bytes of a JPEG, PNG, WebP, BMP, GIF or TIFF file, raw or base64-encoded "
    "(see mlflow_clip.client.encode_image)"
)
PATH_FIX = "the model never reads paths or URLs, send the image bytes (see mlflow_clip.client.encode_image)"
ARRAY_FIX = "send uint8 pixels shaped HxWx3 (RGB), HxW (gray) or HxWx4 (RGBA)"
TOO_LARGE_FIX = "downscale or recompress the image before sending, or raise InputLimits.max_bytes"
TOO_MANY_PIXELS_FIX = (
    "downscale the image before sending (CLIP sees at most a few hundred pixels per side), "
    "or raise InputLimits.max_pixels"
)
CORRUPT_FIX = "send the complete, unmodified file (check that the upload or base64 step is intact)"

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
_BASE64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_="
_WHITESPACE = b" \t\r\n\v\f"
_LINE_BREAKS = b"\r\n"  # MIME base64 wraps lines; spaces inside base64 text are refused
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB headers Pillow's BMP plugin reads
_TIFF_PREFIXES = (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00", b"II+\x00", b"MM\x00+")
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"SIMPLE  =", "FITS"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
)
_REFUSED_MEDIA_TYPES = {
    "image/svg+xml": "SVG",
    "application/pdf": "PDF",
    "application/postscript": "EPS",
    "application/eps": "EPS",
    "image/eps": "EPS",
    "image/x-eps": "EPS",
}
_MEDIA_TYPE = re.compile(r"[a-z0-9.+-]{1,40}/[a-z0-9.+-]{1,40}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|file:|[A-Za-z]:[\\/]")  # http://, s3://, file:, C:\
_PATH_START = ("/", "~", "./", "../", "\\", ".\\", "..\\")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{1,4}$")
_MAX_PATH_LENGTH = 4096
_EXIF_TRANSPOSE = {  # EXIF orientation -> transposition that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageInputError(MlflowClipError, ValueError):
    """One image input could not be used: ``reason`` says why, ``fix`` what to send instead.

    Messages never contain the input itself, at most its type and length.
    """

    def __init__(self, reason: str, fix: str = SEND_IMAGE_FIX) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
        self.fix = fix

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.reason, self.fix))


def decode_image(value: object, limits: InputLimits = DEFAULT_LIMITS, draft_size: int | None = None) -> Image.Image:
    """Decode one image input into a loaded, upright, mode "RGB" image detached from its source.

    Raises ``ImageInputError`` for anything that is not a supported image. With ``draft_size``,
    JPEGs are decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at
    least ``draft_size`` pixels (Pillow's draft mode): much faster on large photos, at the price
    of small pixel differences against a full decode; other formats are unaffected.

        >>> import numpy as np
        >>> decode_image(np.zeros((2, 3), dtype=np.uint8)).size
        (3, 2)
    """
    if isinstance(value, np.ndarray):  # Image.fromarray shares the caller's memory: copy it
        image = _image_from_array(value, limits)
        rgb = to_rgb(image)
        return rgb.copy() if rgb is image else rgb
    # Decoded pixels live in memory the image owns; a copy would cost ~5 ms for a 1080p photo.
    return to_rgb(_open_image(_encoded_bytes(value, limits), limits, draft_size))


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` upright (EXIF orientation applied) and in mode "RGB", 8 bits per channel.

    Transparency is composited over white; 16-bit and float images are scaled, not clipped. The
    input image is not modified; it is returned as is when it already is upright RGB.

        >>> to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    image.load()
    return _to_rgb_mode(_upright(image))


# ---------------------------------------------------------------------------------------------
# From a request cell to encoded bytes


def _encoded_bytes(value: object, limits: InputLimits) -> bytes:
    if isinstance(value, str):
        return _bytes_from_str(value, limits)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_from_binary(value, limits)
    raise ImageInputError(
        f"unsupported input type {type(value).__name__}",
        "send image bytes, base64 text, a data:image URI or a uint8 numpy array (see mlflow_clip.client.encode_image)",
    )


def _bytes_from_binary(value: bytes | bytearray | memoryview, limits: InputLimits) -> bytes:
    size = value.nbytes if isinstance(value, memoryview) else len(value)
    if size == 0:
        raise ImageInputError("empty input (0 bytes)")
    if size > 2 * limits.max_bytes + 1024:  # larger than any base64 text of an allowed image
        raise ImageInputError(_too_large(size, limits), TOO_LARGE_FIX)
    data = bytes(value)
    if _sniff_allowed(data) is not None:
        _check_byte_count(len(data), limits)
        return data
    _refuse_known_format(data)
    return _bytes_from_text(data, limits)


def _bytes_from_str(text: str, limits: InputLimits) -> bytes:
    if not text.strip():
        raise ImageInputError(f"empty input (str of length {len(text)})")
    if len(text) > 2 * limits.max_bytes + 1024:
        raise ImageInputError(_too_large(len(text) * 3 // 4, limits), TOO_LARGE_FIX)
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        if _looks_like_path_or_url(text.strip()):
            raise ImageInputError("looks like a file path or URL", PATH_FIX) from None
        raise ImageInputError(
            f"not an image: a str of length {len(text)} with non-ASCII characters is neither base64 nor a data URI"
        ) from None
    return _bytes_from_text(data, limits)


def _bytes_from_text(text: bytes, limits: InputLimits) -> bytes:
    """Base64 text or a data URI (the caller has ruled out raw image bytes)."""
    stripped = text.strip()
    if stripped[:5].lower() == b"data:":
        return _bytes_from_data_uri(stripped, limits)
    decoded = _decode_base64(stripped, limits)
    if decoded is not None and _sniff_allowed(decoded) is not None:
        return decoded
    if _looks_like_path_or_url(stripped.decode("latin-1")):
        raise ImageInputError("looks like a file path or URL", PATH_FIX)
    if decoded is None:
        raise ImageInputError(
            f"not an image: {len(text)} bytes that are neither a supported image file nor base64 text nor a data URI"
        )
    _refuse_known_format(decoded)
    return decoded


def _bytes_from_data_uri(uri: bytes, limits: InputLimits) -> bytes:
    header, comma, payload = uri.partition(b",")
    if not comma or len(header) > 256:
        raise ImageInputError("malformed data URI", "use data:image/png;base64,<base64 bytes>")
    media_type, *parameters = header[5:].decode("latin-1").split(";")
    media_type = media_type.strip().lower()
    if "base64" not in (p.strip().lower() for p in parameters):
        raise ImageInputError("data URI is not base64-encoded", "use data:image/png;base64,<base64 bytes>")
    _check_media_type(media_type)
    decoded = _decode_base64(payload.strip(), limits)
    if decoded is None:
        raise ImageInputError(
            f"data URI payload ({len(payload)} characters) is not valid base64",
            "use data:image/png;base64,<base64 bytes>",
        )
    _refuse_known_format(decoded)
    return decoded


def _check_media_type(media_type: str) -> None:
    if media_type in _REFUSED_MEDIA_TYPES:
        raise ImageInputError(f"unsupported format {_REFUSED_MEDIA_TYPES[media_type]}")
    if media_type in ("", "application/octet-stream") or media_type.startswith("image/"):
        return
    shown = media_type if _MEDIA_TYPE.fullmatch(media_type) else "unrecognised"
    raise ImageInputError(f"data URI media type {shown} is not an image")


def _decode_base64(text: bytes, limits: InputLimits) -> bytes | None:
    """Strict base64 (standard or urlsafe alphabet, padding optional, line breaks ignored)."""
    compact = text.translate(None, _LINE_BREAKS)
    if not compact or compact.translate(None, _BASE64_CHARS):
        return None
    _check_byte_count(len(compact) * 3 // 4 - 2, limits)
    if len(compact) % 4 == 1:
        return None
    padded = compact + b"=" * (-len(compact) % 4)
    altchars = b"-_" if (b"-" in compact or b"_" in compact) else None
    try:
        decoded = base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None
    _check_byte_count(len(decoded), limits)
    return decoded or None


def _looks_like_path_or_url(text: str) -> bool:
    if len(text) > _MAX_PATH_LENGTH or "\n" in text:
        return False
    return bool(_URL.match(text) or text.startswith(_PATH_START) or _FILE_EXTENSION.search(text))


# ---------------------------------------------------------------------------------------------
# Sniffing and size checks


def _sniff_allowed(data: bytes) -> str | None:
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


def _sniff_refused(data: bytes) -> str | None:
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _iso_media_name(data[8:12])
    if data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7") and data[2:3] in _WHITESPACE:
        return "PNM"
    head = data[:1024].lstrip(b"\xef\xbb\xbf" + _WHITESPACE).lower()
    if head.startswith(b"<"):
        return "SVG" if b"<svg" in head else "XML/HTML"
    return None


def _iso_media_name(brand: bytes) -> str:
    if brand in (b"avif", b"avis"):
        return "AVIF"
    if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "HEIC"
    return "MP4/QuickTime"


def _refuse_known_format(data: bytes) -> None:
    name = _sniff_refused(data)
    if name is not None:
        raise ImageInputError(f"unsupported format {name}")


def _check_byte_count(size: int, limits: InputLimits) -> None:
    if size > limits.max_bytes:
        raise ImageInputError(_too_large(size, limits), TOO_LARGE_FIX)


def _too_large(size: int, limits: InputLimits) -> str:
    return f"too large: {size} bytes > limit {limits.max_bytes}"


def _check_pixel_count(width: int, height: int, limits: InputLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(f"empty image ({width}x{height} pixels)")
    if width * height > limits.max_pixels:
        raise ImageInputError(
            f"too many pixels: {width * height} ({width}x{height}) > limit {limits.max_pixels}",
            TOO_MANY_PIXELS_FIX,
        )


def _raise_pillow_pixel_limit(max_pixels: int) -> None:
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


# ---------------------------------------------------------------------------------------------
# Decoding


def _open_image(data: bytes, limits: InputLimits, draft_size: int | None = None) -> Image.Image:
    sniffed = _sniff_allowed(data)
    if sniffed is None:  # the same test Pillow's allowed openers apply: none of them would accept
        raise ImageInputError(f"not an image ({len(data)} bytes in no supported format)")
    _raise_pillow_pixel_limit(limits.max_pixels)
    described = f"{sniffed}, {len(data)} bytes"
    try:
        image = Image.open(io.BytesIO(data), formats=_PILLOW_OPENERS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(_bomb_reason(described), TOO_MANY_PIXELS_FIX) from e
    except (UnidentifiedImageError, *_PILLOW_DECODE_ERRORS) as e:  # its header is unreadable
        raise ImageInputError(f"truncated or corrupt image ({described})", CORRUPT_FIX) from e
    if image.format not in ALLOWED_FORMATS:
        raise ImageInputError(f"unsupported format {image.format}")
    _check_pixel_count(image.width, image.height, limits)
    if draft_size and image.format == "JPEG":
        image.draft(None, (draft_size, draft_size))  # keeps the mode; scale set by the short side
    try:
        image.load()  # the first frame of animated GIF / WebP / APNG / MPO / multi-page TIFF
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(_bomb_reason(described), TOO_MANY_PIXELS_FIX) from e
    except _PILLOW_DECODE_ERRORS as e:
        raise ImageInputError(f"truncated or corrupt image ({described})", CORRUPT_FIX) from e
    return image


def _bomb_reason(described: str) -> str:
    return f"too many pixels ({described}; over Pillow's limit of {Image.MAX_IMAGE_PIXELS})"


def _image_from_array(array: np.ndarray, limits: InputLimits) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageInputError(f"unsupported array dtype {array.dtype}", ARRAY_FIX)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(f"unsupported array shape {array.shape}", ARRAY_FIX)
    _check_pixel_count(array.shape[1], array.shape[0], limits)
    return Image.fromarray(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------
# Orientation and modes


def _upright(image: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose``'s pixel mapping, without its metadata rewrite (which raises on
    some corrupt EXIF blocks and is useless here)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _PILLOW_DECODE_ERRORS:  # unreadable EXIF: keep the pixels as stored, as CLIP does
        return image
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _to_rgb_mode(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and image.has_transparency_data):
        return _composite_on_white(image)
    if mode.startswith("I"):
        return _rgb_from_16bit(image)
    if mode == "F":
        return _rgb_from_float(image)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    except ValueError as e:
        raise ImageInputError(f"unsupported image mode {mode}", "convert the image to RGB before sending") from e


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "La":
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _rgb_from_16bit(image: Image.Image) -> Image.Image:
    """I;16 / I;16B / I;16L / I (16-bit PNG or TIFF): value / 257, rounded (65535 -> 255)."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8)).convert("RGB")


def _rgb_from_float(image: Image.Image) -> Image.Image:
    """F: values in 0..1 are scaled by 255; everything is then clipped to 0..255 and rounded."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")
