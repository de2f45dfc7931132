"""The costliest images we could build in each allowed format, made here as an attacker would.

Each builder takes the image's side (7071 gives 50 million pixels, `max_pixels`) so that the
tests can build small ones quickly and the measurement in docs/decisions/request-budget.md the
full-size ones: progressive JPEGs with their refinement scan repeated, arithmetic-coded and CMYK
JPEGs, 16-bit RGBA PNGs (plain and Adam7-interlaced), lossy and lossless WebPs (padded, with
alpha, animated), GIFs of noise, RLE-compressed and 1-bit BMPs, TIFFs in every compression Pillow
decodes, and files made of tens of thousands of segments, chunks, blocks or strips.

    python tests/costly_images.py [--fit] [--loose] [--only jpeg]   # the table of CPU costs
    COSTLY_CODE=/path/to/older/checkout python tests/costly_images.py   # the same, for older code
"""

from __future__ import annotations

import io
import lzma
import shutil
import struct
import subprocess
import zlib
from typing import Callable

import numpy as np
from PIL import Image, ImageFile

FULL_SIDE = 7071  # 7071 x 7071 = 49,999,041 pixels: the largest square under max_pixels


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    saved, ImageFile.MAXBLOCK = ImageFile.MAXBLOCK, 1 << 27  # progressive JPEGs of noise need it
    try:
        image.save(buffer, fmt, **kwargs)
    finally:
        ImageFile.MAXBLOCK = saved
    return buffer.getvalue()


def _noise(side: int, channels: int = 3, high: int = 256, seed: int = 0) -> np.ndarray:
    shape = (side, side, channels) if channels > 1 else (side, side)
    return np.random.default_rng(seed).integers(0, high, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# JPEG


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan: its SOS segment and the entropy-coded data after it."""
    found, at = [], 2
    while at < len(data) - 1 and data[at + 1] != 0xD9:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        end = at + 2 + length
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0, 0xFF, *range(0xD0, 0xD8))):
                end += 1
            found.append((at, end))
        at = end
    return found


def jpeg_progressive_scans(side: int, scans: int = 100) -> bytes:
    """A flat progressive JPEG (4:4:4) whose last scan, a luma AC refinement, is repeated until
    the file has `scans` scans: each repeat is 14 bytes and one more pass over every block."""
    data = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", quality=90, progressive=True, subsampling=0)
    start, end = jpeg_scans(data)[-1]
    extra = max(0, scans - len(jpeg_scans(data)))
    return data[:end] + data[start:end] * extra + data[end:]


def jpeg_baseline_noise(side: int) -> bytes:
    """Noise at the quality that keeps a 50 MP file under 32 MB: the most entropy-coded data."""
    return encode(Image.fromarray(_noise(side)), "JPEG", quality=50, subsampling=2)


def jpeg_progressive_noise(side: int) -> bytes:
    return encode(Image.fromarray(_noise(side)), "JPEG", quality=30, subsampling=2, progressive=True)


def jpeg_cmyk(side: int) -> bytes:
    """Four components at full resolution, and the CMYK to RGB conversion after."""
    pixels = _noise(side, 4, high=32) + 100
    return encode(Image.fromarray(pixels, "CMYK"), "JPEG", quality=60)


def jpeg_arithmetic_scans(side: int) -> bytes | None:
    """Arithmetic-coded, 34 scans (each coefficient band refined bit by bit), padded with an
    APP15 segment to pass the pixels-per-byte check of the old code (it compresses 50 MP into
    a few hundred bytes). Needs `jpegtran` (libjpeg-turbo-progs): Pillow cannot write it."""
    if shutil.which("jpegtran") is None:
        return None
    script = ["0,1,2: 0-0, 0, 0;"]
    for component in range(3):
        script.append(f"{component}: 1-63, 0, 10;")
        script += [f"{component}: 1-63, {al + 1}, {al};" for al in range(9, -1, -1)]
    flat = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", quality=90, subsampling=0)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
        file.write("\n".join(script) + "\n")
        file.flush()
        out = subprocess.run(
            ["jpegtran", "-arithmetic", "-scans", file.name], input=flat, capture_output=True, check=True
        ).stdout
    return jpeg_padded(out, 60_000)


def jpeg_padded(data: bytes, size: int) -> bytes:
    segments = b""
    while size > 0:
        n = min(size, 65533)
        segments += b"\xff\xef" + struct.pack(">H", n + 2) + b"\0" * n
        size -= n
    return data[:2] + segments + data[2:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 64x64 JPEG whose frame header claims `width` x `height`: a bomb of a few hundred bytes."""
    data = bytearray(encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG"))
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, height, width)
    return bytes(data)


def jpeg_segment_flood(count: int) -> bytes:
    """A small JPEG behind `count` empty comment segments, which Pillow reads one at a time."""
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def jpeg_fill_bytes(count: int) -> bytes:
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    return data[:2] + b"\xff" * count + data[2:]


# ---------------------------------------------------------------------------------------------
# PNG


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_wide(side: int, interlaced: bool = False, bit_depth: int = 16, colour: int = 6) -> bytes:
    """Zero pixels (1,000:1 through zlib) with the Paeth filter on every row, 8 bytes a pixel:
    the most inflating and unfiltering per encoded byte."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    compressor, idat = zlib.compressobj(9), bytearray()
    for x0, y0, dx, dy in passes:
        width, height = -(-(side - x0) // dx), -(-(side - y0) // dy)
        if width and height:
            row = b"\x04" + bytes(width * channels * bit_depth // 8)
            for _ in range(height):
                idat += compressor.compress(row)
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, bit_depth, colour, 0, 0, int(interlaced))
    chunks = b"".join(png_chunk(b"IDAT", bytes(idat[i : i + 65536])) for i in range(0, len(idat), 65536))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + chunks + png_chunk(b"IEND", b"")


def png_padded(data: bytes, size: int) -> bytes:
    """`data` with a private chunk of `size` zero bytes before its end (readers skip it)."""
    return data[:-12] + png_chunk(b"prVt", bytes(size)) + data[-12:]


def png_chunk_flood(count: int) -> bytes:
    """A small PNG with `count` empty private chunks before its image data."""
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    return data[:33] + png_chunk(b"prVt", b"") * count + data[33:]


# ---------------------------------------------------------------------------------------------
# WebP


def webp_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)


def webp_padded(data: bytes, size: int) -> bytes:
    """`data` with a private chunk of `size` zero bytes appended (readers skip unknown chunks)."""
    body = data[12:] + webp_chunk(b"PADD", bytes(size))
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def webp_lossless_flat(side: int, alpha: bool = True) -> bytes:
    """Flat lossless WebP: under 2 KB at any size (the bomb of finding 7, once padded)."""
    mode, colour = ("RGBA", (5, 5, 5, 100)) if alpha else ("RGB", (5, 5, 5))
    return encode(Image.new(mode, (side, side), colour), "WEBP", lossless=True)


def webp_lossless_noise(side: int) -> bytes:
    """Lossless RGBA with sparse noise: real image data, and every transform and the alpha."""
    pixels = np.broadcast_to(np.linspace(0, 255, side, dtype=np.uint8)[None, :, None], (side, side, 4)).copy()
    pixels[::9, ::7] = _noise(side, 4)[::9, ::7]
    return encode(Image.fromarray(pixels, "RGBA"), "WEBP", lossless=True, method=0, quality=0)


def webp_lossy_noise(side: int, alpha: bool = True) -> bytes:
    """Lossy noise at the lowest quality (the most coefficients per byte), with lossless alpha."""
    pixels = _noise(side, 4 if alpha else 3, high=32)
    return encode(Image.fromarray(pixels, "RGBA" if alpha else "RGB"), "WEBP", quality=10, method=0)


def webp_animated(side: int) -> bytes:
    """Two frames; the first (the one decoded) lossless RGBA over the whole canvas."""
    frames = [Image.new("RGBA", (side, side), (5, 5, 5, 100)), Image.new("RGBA", (side, side), (9, 9, 9, 200))]
    return webp_padded(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True), 60_000)


# ---------------------------------------------------------------------------------------------
# GIF


def gif_noise(side: int) -> bytes:
    """A palette image of noise: LZW at its least compressing, then the palette to RGB."""
    return encode(Image.fromarray(_noise(side, 1, high=8), "L").convert("P"), "GIF")


def gif_block_flood(count: int) -> bytes:
    """A small GIF behind `count` one-byte comment extensions, read one at a time by Pillow."""
    data = encode(Image.new("P", (64, 64)), "GIF")
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    return data[:at] + b"!\xfe\x01x\x00" * count + data[at:]


# ---------------------------------------------------------------------------------------------
# BMP


def bmp_rle(width: int, height: int, body: bytes, rle4: bool = False) -> bytes:
    colours = 16 if rle4 else 256
    palette = b"".join(bytes((i, i, i, 0)) for i in range(colours))
    offset = 14 + 40 + len(palette)
    dib = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 4 if rle4 else 8, 2 if rle4 else 1, len(body), 2835, 2835, colours, 0
    )
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + dib + palette + body


def bmp_rle_line_ends(width: int, height: int) -> bytes:
    """RLE8, each row one pixel and an end-of-line: Pillow pads each row one byte at a time, in Python."""
    return bmp_rle(width, height, b"\x01\x07\x00\x00" * height + b"\x00\x01")


def bmp_rle_runs(side: int) -> bytes:
    """RLE8 of one-pixel runs: one Python iteration of Pillow's decoder per two bytes."""
    return bmp_rle(side, side, (b"\x01\x07" * side + b"\x00\x00") * side + b"\x00\x01")


def bmp_1bit(side: int) -> bytes:
    return encode(Image.fromarray(_noise(side, 1, high=2).astype(bool)), "BMP")


# ---------------------------------------------------------------------------------------------
# TIFF


def tiff(width: int, height: int, bits: int, samples: int, compression: int, strips: list[bytes], **tags) -> bytes:
    """A little-endian TIFF of `strips` (encoded), rows split evenly; extra tags by keyword
    (photometric, predictor, extra_samples, sample_format)."""
    entries = {
        256: (4, [width]),
        257: (4, [height]),
        258: (3, [bits] * samples),
        259: (3, [compression]),
        262: (3, [tags.get("photometric", 2)]),
        273: (4, [0] * len(strips)),
        277: (3, [samples]),
        278: (4, [-(-height // len(strips))]),
        279: (4, [len(s) for s in strips]),
        284: (3, [1]),
        339: (3, [tags.get("sample_format", 1)] * samples),
    }
    if tags.get("predictor", 1) != 1:
        entries[317] = (3, [tags["predictor"]])
    if tags.get("extra_samples"):
        entries[338] = (3, list(tags["extra_samples"]))
    data_at = 8 + 2 + 12 * len(entries) + 4
    blobs = sum(len(v) * (2 if t == 3 else 4) for t, v in entries.values() if len(v) * (2 if t == 3 else 4) > 4)
    offsets, at = [], data_at + blobs
    for strip in strips:
        offsets.append(at)
        at += len(strip)
    entries[273] = (4, offsets)
    head, tail = bytearray(b"II*\0" + struct.pack("<IH", 8, len(entries))), bytearray()
    for tag in sorted(entries):
        kind, values = entries[tag]
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(packed) <= 4:
            head += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            head += struct.pack("<HHII", tag, kind, len(values), data_at + len(tail))
            tail += packed
    return bytes(head + b"\0\0\0\0" + tail) + b"".join(strips)


TIFF_CODECS: dict[int, Callable[[bytes], bytes]] = {
    1: lambda raw: raw,
    8: lambda raw: zlib.compress(raw, 9),
    34925: lambda raw: lzma.compress(raw, format=lzma.FORMAT_XZ),
}


def tiff_wide(side: int, compression: int = 8, float32: bool = False) -> bytes:
    """16-bit RGBA (8 bytes a pixel) or 32-bit float grey with the floating-point predictor,
    zero pixels in 64 strips: the most inflating, and scaling after."""
    encode_strip = TIFF_CODECS[compression]
    rows = -(-side // 64)
    if float32:
        raw = bytes(side * 4 * rows)
        tags = dict(photometric=1, sample_format=3, predictor=3)
        return tiff(side, side, 32, 1, compression, [encode_strip(raw)] * 64, **tags)
    raw = bytes(side * 8 * rows)
    return tiff(side, side, 16, 4, compression, [encode_strip(raw)] * 64, extra_samples=(2,))


def tiff_pillow(side: int, compression: str, mode: str = "RGB") -> bytes:
    """A TIFF written by Pillow's libtiff encoder (LZW, JPEG, PackBits, CCITT group 4, ...)."""
    if mode == "1":
        image = Image.fromarray(_noise(side, 1, high=2).astype(bool))
    else:
        image = Image.fromarray(_noise(side, len(mode), high=2) + 100, mode)
    return encode(image, "TIFF", compression=compression)


def tiff_strip_flood(count: int) -> bytes:
    """Uncompressed, one pixel wide and `count` rows of one strip each: Pillow makes a tile per
    strip in Python."""
    return tiff(1, count, 8, 3, 1, [b"\0\0\0"] * count)


# ---------------------------------------------------------------------------------------------
# The table: the worst of each format at full size


WORST: dict[str, Callable[[int], bytes | None]] = {
    "JPEG baseline, noise": jpeg_baseline_noise,
    "JPEG CMYK": jpeg_cmyk,
    "JPEG progressive, noise": jpeg_progressive_noise,
    "JPEG progressive, 100 scans": lambda side: jpeg_progressive_scans(side, 100),
    "JPEG progressive, 6,000 scans (finding 5)": lambda side: jpeg_progressive_scans(side, 6000),
    "JPEG arithmetic, 34 scans, padded": jpeg_arithmetic_scans,
    "PNG 16-bit RGBA": png_wide,
    "PNG 16-bit RGBA, interlaced": lambda side: png_wide(side, interlaced=True),
    "PNG 16-bit grey": lambda side: png_wide(side, colour=0),
    "WebP lossless, flat, padded (finding 7)": lambda side: webp_padded(webp_lossless_flat(side), 60_000),
    "WebP lossless RGBA, noise": webp_lossless_noise,
    "WebP lossy RGBA, noise": webp_lossy_noise,
    "WebP animated, padded": webp_animated,
    "GIF noise": gif_noise,
    "BMP 1-bit": bmp_1bit,
    "BMP RLE8 line ends (2000 wide)": lambda side: bmp_rle_line_ends(2000, side * side // 2000),
    "BMP RLE8 one-pixel runs": lambda side: bmp_rle_runs(min(side, 4000)),
    "TIFF 16-bit RGBA deflate": tiff_wide,
    "TIFF 16-bit RGBA LZMA": lambda side: tiff_wide(side, 34925),
    "TIFF float grey deflate": lambda side: tiff_wide(side, 8, float32=True),
    "TIFF LZW RGB": lambda side: tiff_pillow(side, "tiff_lzw"),
    "TIFF JPEG RGB": lambda side: tiff_pillow(side, "jpeg"),
    "TIFF CCITT G4 1-bit noise": lambda side: tiff_pillow(side, "group4", "1"),
    "TIFF CMYK LZMA": lambda side: tiff_pillow(side, "lzma", "CMYK"),
}
FLOODS: dict[str, Callable[[], bytes]] = {
    "JPEG, 8 million empty segments": lambda: jpeg_segment_flood(8_000_000),
    "JPEG, 32 million fill bytes": lambda: jpeg_fill_bytes(32_000_000),
    "PNG, 2.7 million empty chunks": lambda: png_chunk_flood(2_700_000),
    "GIF, 6 million comment blocks": lambda: gif_block_flood(6_000_000),
    "TIFF, 1 million one-row strips": lambda: tiff_strip_flood(1_000_000),
}


_CHILD = """
import os, sys, time
if os.environ.get("COSTLY_CODE"):  # measure another copy of the package (an editable install finds its own)
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path.insert(0, os.environ["COSTLY_CODE"])
from mlflow_clip.serving.images import open_cell
from mlflow_clip.serving.decode import finish
from mlflow_clip.serving.limits import InputLimits
from mlflow_clip.serving.preprocess import Preprocessor
data = open(sys.argv[1], "rb").read()
loose = dict.fromkeys(["max_decode_ms", "max_image_parts", "max_jpeg_scans", "max_pixels_per_byte"], 10**9)
loose = {k: v for k, v in {**loose, "max_bytes": 2**30}.items() if k in InputLimits.names()}
limits = InputLimits(**loose) if sys.argv[2] == "loose" else InputLimits()
preprocess = Preprocessor(224)
started = time.process_time()
try:
    opened = open_cell(data, limits)
    estimate = getattr(opened, "decode_ms", 0)
    preprocess(finish(opened))
    outcome = f"decoded (estimate {estimate} ms)"
except Exception as e:
    outcome = "refused: " + str(e).split(";")[0][:150]
print(f"{time.process_time() - started:.2f}\\t{outcome}")
"""


def measure(data: bytes, repeats: int = 3, loose: bool = False) -> tuple[float, str]:
    """The least CPU seconds of `repeats` fresh processes decoding and resizing `data` as the
    classifier does (the process's own CPU, all threads), and what happened; `loose` lifts the
    limits that refuse it (to measure what it would cost)."""
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".img") as file:
        file.write(data)
        file.flush()
        runs = [
            subprocess.run(
                [sys.executable, "-c", _CHILD, file.name, "loose" if loose else "strict"],
                capture_output=True,
                text=True,
                check=True,
            )
            for _ in range(repeats)
        ]
    results = [run.stdout.strip().split("\t", 1) for run in runs]
    return min(float(seconds) for seconds, _ in results), results[0][1]


def largest_accepted_side(build: Callable[[int], bytes | None], largest: int = FULL_SIDE) -> int | None:
    """The largest side (within 2%) at which this package's checks accept `build`'s image."""
    from mlflow_clip.serving.images import ImageInputError, open_cell

    def accepted(side: int) -> bool:
        try:
            open_cell(build(side))
            return True
        except ImageInputError:
            return False

    low, high = 64, largest
    if accepted(high):
        return high
    if not accepted(low):
        return None
    while high - low > max(16, low // 50):
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    return low


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=FULL_SIDE)
    parser.add_argument("--only", default="", help="only the images whose name contains this")
    parser.add_argument("--skip", default="", help="not the images whose name contains any of these (|-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loose", action="store_true", help="lift the limits, to measure what each would cost")
    parser.add_argument("--fit", action="store_true", help="each image at the largest side the limits accept")
    args = parser.parse_args()
    builders = {**WORST, **{name: (lambda side, build=build: build()) for name, build in FLOODS.items()}}
    print("| image | bytes | CPU s | outcome |\n|---|---|---|---|")
    for name, build in builders.items():
        skipped = any(part and part.lower() in name.lower() for part in args.skip.split("|"))
        if args.only.lower() not in name.lower() or skipped:
            continue
        side = largest_accepted_side(build, args.side) if args.fit and name in WORST else args.side
        if side is None:
            print(f"| {name} | - | - | refused at any size |", flush=True)
            continue
        data = build(side)
        name = f"{name} ({side}x{side})" if args.fit and name in WORST else name
        if data is None:
            print(f"| {name} | - | - | not built (needs jpegtran) |", flush=True)
            continue
        seconds, outcome = measure(data, args.repeats, args.loose)
        print(f"| {name} | {len(data):,} | {seconds:.2f} | {outcome} |", flush=True)


if __name__ == "__main__":
    main()
