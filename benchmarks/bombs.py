"""Hostile images made here, as an attacker would send them: decompression bombs of a few dozen
to a few hundred bytes whose header declares tens of millions of pixels (PNG, JPEG, GIF, BMP RLE,
TIFF) and a real lossless WebP of 25 megapixels in about a kilobyte. The hostile-traffic soak
sends them; the tests use them too."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (10, 10)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def bmp_rle_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (10, 10)), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    struct.pack_into("<I", data, 30, 1)  # BI_RLE8: a few bytes of deltas can fill the canvas
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (16, 16)), "TIFF", compression="tiff_adobe_deflate"))
    (offset,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, offset)
    for entry in range(count):
        at = offset + 2 + 12 * entry
        tag, kind = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<I" if kind == 4 else "<H", data, at + 8, value)
            if kind == 3:
                struct.pack_into("<HI", data, at + 2, 4, 1)
                struct.pack_into("<I", data, at + 8, value)
    return bytes(data)


def lossless_webp_bomb() -> bytes:
    """A real lossless WebP of 5000x5000 in about a kilobyte: under max_pixels, far over the ratio."""
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), (5, 5, 5)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


BOMBS = {
    "PNG declaring 9000x9000": lambda: png_header(9000, 9000),
    "PNG declaring 7000x7000 (under max_pixels)": lambda: png_header(7000, 7000),
    "JPEG header of 9400x9400 over 64x64 data": lambda: jpeg_claiming(9400, 9400),
    "JPEG header of 6000x6000 over 64x64 data": lambda: jpeg_claiming(6000, 6000),
    "GIF logical screen of 65535x1000": lambda: gif_claiming(65535, 1000),
    "BMP RLE of 9000x9000": lambda: bmp_rle_claiming(9000, 9000),
    "TIFF deflate of 9000x9000": lambda: tiff_claiming(9000, 9000),
}
