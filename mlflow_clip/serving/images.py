"""Turn one request cell into a decoded, upright, 8-bit RGB PIL image.

Serving side: numpy, Pillow and the standard library only (never torch).

``decode_image`` accepts raw encoded bytes (JPEG, PNG, WebP, BMP, GIF, TIFF, MPO), the same bytes as
base64 text (``str`` or ``bytes``; standard or urlsafe alphabet, padding optional, line breaks
allowed), ``data:image/...;base64,...`` URIs, and decoded uint8 numpy arrays. It never opens a path
or a URL, never lets Pillow try a format outside the allow-list (EPS would run Ghostscript), and
refuses oversized input before decoding it (`decode.py`: the header's pixel count, the pixels per
encoded byte). Error messages never repeat the payload.

    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGBA", (4, 3), (255, 0, 0, 0)).save(buffer, "PNG")
    >>> image = decode_image(buffer.getvalue())
    >>> image.mode, image.size, image.getpixel((0, 0))
    ('RGB', (4, 3), (255, 255, 255))
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np
from PIL import Image

from .decode import (  # noqa: F401 - ImageInputError and to_rgb are part of this module's API
    ImageInputError,
    OpenedImage,
    finish,
    open_array,
    open_encoded,
    sniff_allowed,
    to_rgb,
)
from .limits import DEFAULT_LIMITS, InputLimits

PATH_FIX = "the model never reads paths or URLs, send the image bytes (see mlflow_clip.client.encode_image)"
TOO_LARGE_FIX = "downscale or recompress the image before sending, or raise InputLimits.max_bytes"
_BASE64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_="
_WHITESPACE = b" \t\r\n\v\f"
_LINE_BREAKS = b"\r\n"  # MIME base64 wraps lines; spaces inside base64 text are refused
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR or TGA"),  # an uncompressed TGA starts with the same 4 bytes
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
    return finish(open_cell(value, limits), draft_size)


def open_cell(value: object, limits: InputLimits = DEFAULT_LIMITS) -> OpenedImage:
    """One request cell opened (header read and checked), not decoded yet."""
    if isinstance(value, np.ndarray):
        return open_array(value, limits)
    return open_encoded(_encoded_bytes(value, limits), limits)


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
    if sniff_allowed(data) is not None:
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
    if decoded is not None and sniff_allowed(decoded) is not None:
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
    payload = split_data_uri(uri.decode("latin-1")).encode("latin-1")
    decoded = _decode_base64(payload.strip(), limits)
    if decoded is None:
        raise ImageInputError(
            f"data URI payload ({len(payload)} characters) is not valid base64",
            "use data:image/png;base64,<base64 bytes>",
        )
    _refuse_known_format(decoded)
    return decoded


def split_data_uri(uri: str) -> str:
    """The base64 payload of a ``data:`` URI, once its header is checked: base64-encoded, and a
    media type that is an image (or none, or application/octet-stream). The same rule applies
    wherever a data URI arrives (`mlflow-clip serve` unwraps them in dataframe bodies with it).

        >>> split_data_uri("data:image/png;base64,iVBORw0K")
        'iVBORw0K'
    """
    header, comma, payload = uri.strip().partition(",")
    if not comma or len(header) > 256 or header[:5].lower() != "data:":
        raise ImageInputError("malformed data URI", "use data:image/png;base64,<base64 bytes>")
    media_type, *parameters = header[5:].split(";")
    media_type = media_type.strip().lower()
    if "base64" not in (p.strip().lower() for p in parameters):
        raise ImageInputError("data URI is not base64-encoded", "use data:image/png;base64,<base64 bytes>")
    _check_media_type(media_type)
    return payload


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
