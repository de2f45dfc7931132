"""The CPU time an image will cost, estimated from its header and structure before it decodes.

Decoding one image costs what its codec does per pixel, per byte it inflates and per byte it
reads, plus libjpeg's passes over the image for each progressive scan, plus what serving does
after (composite transparency on white, scale 16-bit and float pixels, resize to the model's
input). `estimate_ms` adds those up with the figures measured for the worst image of each
format that could be built (docs/decisions/request-budget.md; 2-core AMD EPYC with AVX-512,
Pillow 13): an upper bound of this machine's CPU milliseconds, which `max_decode_ms` bounds for
one image and `max_request_decode_ms` for a request. A faster core spends less.

    >>> Cost.of(Structure(parts=9, payload=2_000_000, codec="jpeg"), "RGB", 4000 * 3000).ms  # doctest: +SKIP
    235
"""

from __future__ import annotations

from dataclasses import dataclass

from .structure import Structure


@dataclass(frozen=True)
class Rates:
    """Nanoseconds per pixel, per raw decoded byte, per encoded byte read, per pixel and scan."""

    pixel: float = 0.0
    raw_byte: float = 0.0
    payload_byte: float = 0.0
    pixel_scan: float = 0.0


# The worst measured per format (each rate covers the worst content found for it).
CODEC_RATES: dict[str, Rates] = {
    "jpeg": Rates(pixel=7.0, payload_byte=15.0),
    "jpeg-progressive": Rates(pixel=7.0, payload_byte=30.0, pixel_scan=0.9),
    "png": Rates(pixel=3.0, raw_byte=5.5, payload_byte=10.0),
    "png-interlaced": Rates(pixel=4.0, raw_byte=5.5, payload_byte=10.0),
    "gif": Rates(pixel=6.0, payload_byte=8.0),
    "webp-lossy": Rates(pixel=16.0, payload_byte=20.0),
    "webp-lossless": Rates(pixel=16.0, payload_byte=30.0),
    "bmp": Rates(pixel=2.0, raw_byte=1.0),
    "bmp-rle": Rates(pixel=250.0, payload_byte=800.0),  # Pillow decodes RLE in Python, a read per byte
}
TIFF_RATES: dict[int, Rates] = {  # by TIFF compression number
    1: Rates(pixel=2.0, raw_byte=2.0),  # none
    5: Rates(pixel=2.0, raw_byte=2.5, payload_byte=5.0),  # LZW
    7: Rates(pixel=12.0, payload_byte=12.0),  # JPEG
    8: Rates(pixel=2.0, raw_byte=3.5, payload_byte=10.0),  # Adobe deflate
    32946: Rates(pixel=2.0, raw_byte=3.5, payload_byte=10.0),  # deflate
    32773: Rates(pixel=2.0, raw_byte=3.0, payload_byte=10.0),  # PackBits
    34925: Rates(pixel=2.0, raw_byte=3.0, payload_byte=60.0),  # LZMA
    50000: Rates(pixel=2.0, raw_byte=2.0, payload_byte=10.0),  # Zstandard
}
OTHER_TIFF = Rates(pixel=12.0, raw_byte=8.0, payload_byte=60.0)  # CCITT, old JPEG, and the rest
# After decoding, per pixel: the conversion to 8-bit RGB for each Pillow mode, then the resize.
CONVERT_NS: dict[str, float] = {
    "RGB": 0.0,
    "L": 3.0,
    "1": 4.0,
    "CMYK": 12.0,
    "YCbCr": 6.0,
    "LAB": 10.0,
    "HSV": 10.0,
    "RGBX": 4.0,
}
ALPHA_NS = 15.0  # RGBA, LA, PA and transparent P, composited on white
WIDE_NS = 12.0  # 16-bit and 32-bit integer pixels, scaled
FLOAT_NS = 40.0  # 32-bit float pixels, scaled and clipped
RESIZE_NS = 8.0


@dataclass(frozen=True)
class Cost:
    """One image's estimated decode cost, and the figures it is made of (for its error)."""

    ms: int
    pixels: int
    structure: Structure

    @classmethod
    def of(cls, structure: Structure, mode: str, pixels: int) -> Cost:
        rates = codec_rates(structure.codec)
        raw_bytes = pixels * structure.bits_per_pixel / 8
        ns = (
            pixels * (rates.pixel + convert_ns(mode) + RESIZE_NS)
            + raw_bytes * rates.raw_byte
            + structure.payload * rates.payload_byte
            + pixels * structure.scans * rates.pixel_scan
        )
        return cls(int(ns / 1e6) + 1, pixels, structure)

    def describe(self) -> str:
        """What the estimate is made of, e.g. '50000000 pixels x 100 scans of progressive JPEG'."""
        codec = self.structure.codec
        name = _CODEC_NAMES.get(codec) or f"TIFF (compression {codec.removeprefix('tiff-')})"
        scans = f" x {self.structure.scans} scans" if self.structure.scans > 1 else ""
        return f"{self.pixels} pixels{scans} of {name}, {self.structure.payload} bytes of image data"


_CODEC_NAMES = {
    "jpeg": "JPEG",
    "jpeg-progressive": "progressive JPEG",
    "png": "PNG",
    "png-interlaced": "interlaced PNG",
    "gif": "GIF",
    "webp-lossy": "lossy WebP",
    "webp-lossless": "lossless WebP",
    "bmp": "BMP",
    "bmp-rle": "RLE-compressed BMP (decoded in Python)",
}


def codec_rates(codec: str) -> Rates:
    if codec.startswith("tiff-"):
        number = codec.removeprefix("tiff-")
        return TIFF_RATES.get(int(number), OTHER_TIFF) if number.isdigit() else OTHER_TIFF
    return CODEC_RATES[codec]


def convert_ns(mode: str) -> float:
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P"):  # P: its transparency is known once decoded
        return ALPHA_NS
    if mode.startswith("I"):
        return WIDE_NS
    if mode == "F":
        return FLOAT_NS
    return CONVERT_NS.get(mode, 10.0)
