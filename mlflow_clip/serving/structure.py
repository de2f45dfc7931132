"""What decoding an encoded image will walk, read from its bytes before any decoder runs.

Pillow reads an image's markers, chunks, blocks and strips in Python, at one to four microseconds
apiece, before and while its C decoders run: 32 MB of empty JPEG segments, PNG chunks or TIFF
strips cost it seconds. libjpeg runs every progressive scan over the whole image. `read_structure`
walks the same structure at C speed (`bytes.find`, regular expressions, `struct`) and gives up as
soon as the parts pass `max_parts`, so that the parts Pillow would walk, the scans libjpeg would
run and the bytes that carry image data are known before Pillow opens the file. The walk mirrors
Pillow's own readers (the JPEG header's junk and fill bytes included); where a file is damaged
it stops, and Pillow refuses the file on its own.

    >>> read_structure(png_bytes, "PNG", max_parts=65_536).payload  # doctest: +SKIP
    1234
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .errors import TooManyParts

_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker inside entropy-coded data
_JPEG_NOT_FF = re.compile(rb"[^\xff]+")
_JPEG_FILL = re.compile(rb"\xff+")
_GIF_JUNK = re.compile(rb"[^!,;]+")
_JPEG_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
_TIFF_STRIP_OFFSETS, _TIFF_STRIP_COUNTS, _TIFF_TILE_OFFSETS, _TIFF_TILE_COUNTS = 273, 279, 324, 325
_TIFF_BITS, _TIFF_COMPRESSION, _TIFF_SAMPLES = 258, 259, 277


@dataclass(frozen=True)
class Structure:
    """What one encoded image holds, as its decoders will walk it.

    `parts`: what Pillow walks in Python (JPEG segments, junk and fill bytes before the first
    scan; PNG chunks; GIF extension blocks and their sub-blocks; WebP chunks; TIFF tag entries
    and strips or tiles). `payload`: the bytes that carry image data (JPEG scans, PNG IDAT, the
    first GIF image's data, the first WebP frame, TIFF strips or tiles, the BMP pixel array),
    so that padding elsewhere never counts. `scans`: libjpeg's passes over the image (SOS
    markers; 1 elsewhere). `codec` names what decodes it, for the cost model: `jpeg`,
    `jpeg-progressive`, `png`, `png-interlaced`, `gif`, `webp-lossy`, `webp-lossless`, `bmp`,
    `bmp-rle`, or `tiff-<compression number>`. `bits_per_pixel`: the raw decoded bits of a pixel
    (PNG, TIFF and BMP; 0 where the codec sets the work). `scan_offsets`: where each JPEG scan
    starts, so that a decoder can be fed one scan at a time.
    """

    parts: int
    payload: int
    codec: str
    scans: int = 1
    bits_per_pixel: int = 0
    scan_offsets: tuple[int, ...] = ()


class _Parts:
    def __init__(self, limit: int, what: str):
        self.count, self.limit, self.what = 0, limit, what

    def add(self, n: int = 1) -> None:
        self.count += n
        if self.count > self.limit:
            raise TooManyParts(self.limit, self.what)


def read_structure(data: bytes, image_format: str, max_parts: int) -> Structure:
    """Walk `data` (an image of `image_format`, as sniffed) without decoding it; raises
    `TooManyParts` once more than `max_parts` parts are counted, having walked no further. A
    file cut short or damaged gets the costliest codec of its format and no image data: the
    checks that follow treat it as the worst it could be, and Pillow refuses it on its own."""
    reader, what, damaged = _READERS[image_format]
    parts = _Parts(max_parts, what)
    try:
        return reader(data, parts)
    except (IndexError, struct.error):
        return Structure(parts.count, 0, damaged, bits_per_pixel=64)


# ---------------------------------------------------------------------------------------------
# JPEG: Pillow's header loop (junk and fill bytes one by one), then libjpeg's scans


def _jpeg(data: bytes, parts: _Parts) -> Structure:
    at, codec = _jpeg_header(data, parts)
    if at < 0:
        return Structure(parts.count, 0, codec)
    scans, first_scan, end = [], at, len(data)
    while at >= 0 and at < len(data):
        marker = data[at + 1]
        if marker == _JPEG_EOI:
            end = at
            break
        parts.add()
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == _JPEG_SOS:
            scans.append(at)
        found = _JPEG_MARKER.search(data, at + 2 + length)
        at = found.start() if found else -1
    return Structure(parts.count, end - first_scan, codec, scans=max(len(scans), 1), scan_offsets=tuple(scans))


def _jpeg_header(data: bytes, parts: _Parts) -> tuple[int, str]:
    """Walk to the first SOS as Pillow's `JpegImageFile._open` does; (its offset or -1, codec)."""
    at, codec = 2, "jpeg"
    while at < len(data):
        if data[at] != 0xFF:  # Pillow skips junk one byte at a time
            junk = _JPEG_NOT_FF.match(data, at)
            parts.add(junk.end() - at)
            at = junk.end()
            continue
        fill = _JPEG_FILL.match(data, at)
        if fill.end() - at > 1:  # Pillow steps over each 0xFF fill byte on its own
            parts.add(fill.end() - at - 1)
            at = fill.end() - 1
        if at + 1 >= len(data):
            break
        marker = data[at + 1]
        if marker == _JPEG_SOS:  # counted with the scans
            return at, codec
        parts.add()
        if marker == 0x00 or marker in _JPEG_STANDALONE or marker == _JPEG_EOI:
            at += 2
            continue
        if marker in _JPEG_SOF:
            codec = "jpeg-progressive" if marker in _JPEG_PROGRESSIVE else "jpeg"
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return -1, codec


# ---------------------------------------------------------------------------------------------
# PNG: every chunk (Pillow reads them one by one, before and after the image data)


def _png(data: bytes, parts: _Parts) -> Structure:
    at, payload, bits, interlaced = 8, 0, 0, False
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        parts.add()
        if kind == b"IHDR" and length >= 13:
            depth, colour, interlace = data[at + 16], data[at + 17], data[at + 20]
            bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
            interlaced = interlace == 1
        elif kind == b"IDAT":
            payload += length
        elif kind == b"IEND":
            break
        at += 12 + length
    return Structure(parts.count, payload, "png-interlaced" if interlaced else "png", bits_per_pixel=bits)


# ---------------------------------------------------------------------------------------------
# GIF: the blocks before the first image (Pillow reads those in Python), then its data


def _gif(data: bytes, parts: _Parts) -> Structure:
    at = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)
    while at < len(data):
        kind = data[at]
        if kind not in b"!,;":  # Pillow skips any other byte one at a time
            junk = _GIF_JUNK.match(data, at)
            parts.add(junk.end() - at)
            at = junk.end()
            continue
        parts.add()
        if kind == 0x21:  # extension: label, then sub-blocks
            at = _gif_sub_blocks(data, at + 2, parts)[0]
        elif kind == 0x2C:  # the first image: descriptor, local colour table, LZW code size, data
            flags = data[at + 9] if at + 9 < len(data) else 0
            at += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            return Structure(parts.count, _gif_sub_blocks(data, at, None)[1], "gif")
        else:
            break
    return Structure(parts.count, 0, "gif")


def _gif_sub_blocks(data: bytes, at: int, parts: _Parts | None) -> tuple[int, int]:
    """(the offset after the sub-blocks starting at `at`, their data bytes)."""
    size = 0
    while at < len(data) and data[at]:
        if parts is not None:
            parts.add()
        size += data[at]
        at += 1 + data[at]
    return at + 1, size


# ---------------------------------------------------------------------------------------------
# WebP: RIFF chunks; the first frame (or animation frame) carries the image data


def _webp(data: bytes, parts: _Parts) -> Structure:
    payload, lossless, at, end = 0, False, 12, min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    first_frame = True
    while at + 8 <= end:
        kind, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        parts.add()
        if kind == b"ANMF" and first_frame:
            inner = _webp_frame(data[at + 24 : at + 8 + size])
            payload, lossless, first_frame = inner[0], inner[1], False
        elif kind in (b"VP8 ", b"VP8L", b"ALPH") and first_frame:
            payload += size
            lossless = lossless or kind == b"VP8L"
        at += 8 + size + (size & 1)
    return Structure(parts.count, payload, "webp-lossless" if lossless else "webp-lossy")


def _webp_frame(frame: bytes) -> tuple[int, bool]:
    payload, lossless, at = 0, False, 0
    while at + 8 <= len(frame):
        kind, size = frame[at : at + 4], int.from_bytes(frame[at + 4 : at + 8], "little")
        if kind in (b"VP8 ", b"VP8L", b"ALPH"):
            payload += size
            lossless = lossless or kind == b"VP8L"
        at += 8 + size + (size & 1)
    return payload, lossless


# ---------------------------------------------------------------------------------------------
# TIFF: the first directory's entries, strips or tiles (Pillow reads only the first page)


def _tiff(data: bytes, parts: _Parts) -> Structure:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    count_format, entry_size, offset_format = ("Q", 20, "Q") if big else ("H", 12, "I")
    ifd = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
    (entries,) = struct.unpack_from(order + count_format, data, ifd)
    parts.add(entries)
    tags: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, offset of the value)
    for index in range(entries):
        at = ifd + (8 if big else 2) + index * entry_size
        if at + entry_size > len(data):
            break
        tag, kind = struct.unpack_from(order + "HH", data, at)
        count = struct.unpack_from(order + offset_format, data, at + 4)[0]
        inline = count * _TIFF_TYPE_SIZES.get(kind, 1) <= (8 if big else 4)
        value_at = at + 4 + (8 if big else 4)
        tags[tag] = (kind, count, value_at if inline else struct.unpack_from(order + offset_format, data, value_at)[0])
    strips = tags.get(_TIFF_STRIP_OFFSETS) or tags.get(_TIFF_TILE_OFFSETS)
    parts.add(strips[1] if strips else 0)
    counts = tags.get(_TIFF_STRIP_COUNTS) or tags.get(_TIFF_TILE_COUNTS)
    payload = min(len(data), sum(_tiff_values(data, order, counts))) if counts else 0
    bits = sum(_tiff_values(data, order, tags[_TIFF_BITS])) if _TIFF_BITS in tags else 1
    samples = _tiff_values(data, order, tags[_TIFF_SAMPLES])[:1] if _TIFF_SAMPLES in tags else [1]
    if _TIFF_BITS in tags and tags[_TIFF_BITS][1] == 1 and samples and samples[0] > 1:
        bits *= samples[0]  # one BitsPerSample value for every sample
    compression = _tiff_values(data, order, tags[_TIFF_COMPRESSION])[:1] if _TIFF_COMPRESSION in tags else [1]
    return Structure(parts.count, payload, f"tiff-{compression[0] if compression else 1}", bits_per_pixel=bits)


def _tiff_values(data: bytes, order: str, entry: tuple[int, int, int]) -> list[int]:
    kind, count, at = entry
    code = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}.get(kind)
    if code is None or at + count * struct.calcsize(code) > len(data):
        return []
    return list(struct.unpack_from(f"{order}{count}{code}", data, at))


# ---------------------------------------------------------------------------------------------
# BMP: one pixel array; RLE4 and RLE8 decode in Python


def _bmp(data: bytes, parts: _Parts) -> Structure:
    offset = int.from_bytes(data[10:14], "little")
    header = int.from_bytes(data[14:18], "little")
    bits = int.from_bytes(data[28:30], "little") if header >= 40 else int.from_bytes(data[24:26], "little")
    compression = int.from_bytes(data[30:34], "little") if header >= 40 else 0
    codec = "bmp-rle" if compression in (1, 2) else "bmp"
    return Structure(1, max(0, len(data) - offset), codec, bits_per_pixel=bits)


_READERS = {  # format: (reader, what its parts are, the costliest codec it can have)
    "JPEG": (_jpeg, "JPEG segments, junk or fill bytes", "jpeg-progressive"),
    "PNG": (_png, "PNG chunks", "png-interlaced"),
    "GIF": (_gif, "GIF blocks", "gif"),
    "WEBP": (_webp, "WebP chunks", "webp-lossless"),
    "TIFF": (_tiff, "TIFF tag entries, strips or tiles", "tiff-0"),
    "BMP": (_bmp, "BMP parts", "bmp-rle"),
}
