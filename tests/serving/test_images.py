"""mlflow_clip.serving.images: every accepted input decodes to upright RGB; everything else is refused.

Torch-free: the images are made here with Pillow and numpy.
"""

from __future__ import annotations

import base64
import builtins
import io
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image, ImageFile, ImageOps

from mlflow_clip.serving import decode as decode_module
from mlflow_clip.serving.images import ImageInputError, decode_image, to_rgb
from mlflow_clip.serving.limits import InputLimits

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
LOSSLESS = ("PNG", "BMP", "GIF", "TIFF")
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def two_colour_image(width: int = 40, height: int = 30) -> Image.Image:
    """Red left half, blue right half."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    return image


def noise_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert np.max(np.abs(np.subtract(pixel, expected))) <= tolerance, (pixel, expected)


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose IHDR claims width x height 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------
# Accepted inputs


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_allowed_format_decodes_to_rgb(fmt):
    decoded = decode_image(encode(two_colour_image(), fmt))
    tolerance = 0 if fmt in LOSSLESS else 12
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 30)
    assert_close(decoded.getpixel((5, 15)), RED, tolerance)
    assert_close(decoded.getpixel((35, 15)), BLUE, tolerance)


def test_multi_picture_jpeg_uses_the_first_picture():
    second = Image.new("RGB", (40, 30), BLUE)
    data = encode(Image.new("RGB", (40, 30), RED), "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert_close(decode_image(data).getpixel((20, 15)), RED, 12)


@pytest.mark.parametrize(
    "to_payload",
    [
        pytest.param(lambda b: base64.b64encode(b).decode(), id="base64-str"),
        pytest.param(lambda b: base64.b64encode(b), id="base64-bytes"),
        pytest.param(lambda b: base64.urlsafe_b64encode(b).decode(), id="urlsafe-str"),
        pytest.param(lambda b: base64.urlsafe_b64encode(b), id="urlsafe-bytes"),
        pytest.param(lambda b: base64.b64encode(b).decode().rstrip("="), id="no-padding"),
        pytest.param(lambda b: base64.encodebytes(b), id="mime-line-breaks"),
        pytest.param(lambda b: base64.b64encode(b).decode() + "\n", id="trailing-newline"),
        pytest.param(lambda b: bytearray(b), id="bytearray"),
        pytest.param(lambda b: memoryview(b), id="memoryview"),
        pytest.param(lambda b: np.bytes_(b), id="numpy-bytes"),
    ],
)
def test_encodings_of_the_same_png_decode_alike(to_payload):
    image = next(two_colour_image(w, 31) for w in range(41, 60) if len(encode(two_colour_image(w, 31), "PNG")) % 3)
    data = encode(image, "PNG")  # its base64 text ends in padding
    decoded = decode_image(to_payload(data))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_urlsafe_payload_really_uses_the_urlsafe_alphabet():
    data = encode(two_colour_image(), "JPEG")  # standard base64 of a JPEG starts with "/9j/"
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert urlsafe.startswith("_9j_")
    assert decode_image(urlsafe).size == (40, 30)


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "", "application/octet-stream"])
def test_data_uris_decode(media_type, as_bytes):
    uri = f"data:{media_type};base64,{base64.b64encode(encode(two_colour_image(), 'PNG')).decode()}"
    decoded = decode_image(uri.encode() if as_bytes else uri)
    assert decoded.size == (40, 30)
    assert decoded.getpixel((5, 5)) == RED


def test_numpy_rgb_array_is_used_as_is_and_detached():
    array = np.zeros((3, 5, 3), dtype=np.uint8)
    array[0, 0] = RED
    decoded = decode_image(array)
    array[0, 0] = BLUE  # the caller's buffer changes after the call
    assert decoded.mode == "RGB" and decoded.size == (5, 3)
    assert decoded.getpixel((0, 0)) == RED


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 1)])
def test_numpy_gray_array_becomes_rgb(shape):
    array = np.full(shape, 77, dtype=np.uint8)
    decoded = decode_image(array)
    assert decoded.mode == "RGB" and decoded.size == (5, 3)
    assert decoded.getpixel((4, 2)) == (77, 77, 77)


def test_numpy_rgba_array_is_composited_on_white():
    array = np.zeros((2, 2, 4), dtype=np.uint8)
    array[0, 0] = (255, 0, 0, 255)  # opaque red; the rest is transparent black
    decoded = decode_image(array)
    assert decoded.getpixel((0, 0)) == RED
    assert decoded.getpixel((1, 1)) == WHITE


# ----------------------------------------------------------------------------------------------
# Orientation and modes


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 128, 0))
    stored.paste(RED, (0, 0, 8, 8))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded = decode_image(encode(stored, "JPEG", exif=exif, quality=95))
    assert decoded.size == (20, 40)  # upright: taller than wide
    assert_close(decoded.getpixel((16, 3)), RED, 30)  # top-left moved to the top-right
    assert_close(decoded.getpixel((3, 3)), (0, 128, 0), 30)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(noise_array(5, 3)), "PNG", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    decoded = decode_image(data)
    assert decoded.size == ((3, 5) if orientation >= 5 else (5, 3))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


def test_unreadable_exif_keeps_the_stored_pixels():
    data = encode(two_colour_image(), "PNG", exif=b"Exif\x00\x00XX\x00\x2a\x00\x00\x00\x08")
    with pytest.raises(SyntaxError):  # Pillow cannot parse it, but the pixels are fine
        Image.open(io.BytesIO(data)).getexif()
    decoded = decode_image(data)
    assert decoded.size == (40, 30) and decoded.getpixel((0, 0)) == RED


@pytest.mark.filterwarnings("ignore")  # Pillow warns about corrupt EXIF tags and big headers
def test_mutated_files_raise_only_image_input_errors():
    rng = np.random.default_rng(4)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [encode(Image.fromarray(noise_array(32, 24)), fmt, exif=exif) for fmt in ("JPEG", "PNG", "WEBP")]
    seeds += [encode(Image.fromarray(noise_array(32, 24)), fmt) for fmt in ("GIF", "TIFF", "BMP")]
    for _ in range(600):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(len(data)))
            data[at : at + int(rng.integers(0, 8))] = rng.bytes(int(rng.integers(0, 8)))
        try:
            assert decode_image(bytes(data)).mode == "RGB"
        except ImageInputError:
            pass


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((1, 1), 1)
    for fmt in ("PNG", "GIF"):
        data = encode(image, fmt, transparency=0)
        assert Image.open(io.BytesIO(data)).mode == "P"
        decoded = decode_image(data)
        assert decoded.getpixel((0, 0)) == WHITE, fmt  # transparent black -> white
        assert decoded.getpixel((1, 1)) == RED, fmt


@pytest.mark.parametrize(
    "mode, transparent, opaque", [("RGBA", (0, 0, 0, 0), (255, 0, 0, 255)), ("LA", (0, 0), (40, 255))]
)
def test_alpha_is_composited_on_white(mode, transparent, opaque):
    image = Image.new(mode, (4, 4), transparent)
    image.putpixel((1, 1), opaque)
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.getpixel((0, 0)) == WHITE
    expected = RED if mode == "RGBA" else (40, 40, 40)
    assert decoded.getpixel((1, 1)) == expected


def test_half_transparent_black_becomes_mid_gray():
    decoded = decode_image(encode(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG"))
    assert_close(decoded.getpixel((0, 0)), (127, 127, 127), 1)


def test_cmyk_jpeg_uses_pillow_conversion():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "CMYK"
    decoded = decode_image(data)
    assert np.array_equal(np.asarray(decoded), np.asarray(opened.convert("RGB")))
    assert_close(decoded.getpixel((8, 8)), RED, 8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_gray_is_scaled_not_clipped(fmt):
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16)
    data = encode(Image.fromarray(np.tile(gradient, (2, 1))), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    row = np.asarray(decode_image(data))[0, :, 0]
    assert row[-1] == 255  # the top of the range
    assert row[128] in (128, 129)  # about half way, where clipping would give 255
    np.testing.assert_array_equal(row, np.round(gradient / 257).astype(np.uint8))


def test_32_bit_integer_mode_is_scaled_like_16_bit():
    values = np.array([[0, 257, 32896, 65535, 70000, -5]], dtype=np.int32)
    rgb = to_rgb(Image.fromarray(values))
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 1, 128, 255, 255, 0])


def test_float_mode_in_unit_range_is_scaled_by_255():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0], [0, 128, 255])
    values = np.array([[-3.0, 100.0, 300.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0], [0, 100, 255])


@pytest.mark.parametrize("mode", ["L", "1", "YCbCr", "LAB", "HSV", "RGBX", "I;16B", "PA", "RGBa"])
def test_to_rgb_handles_other_modes(mode):
    rgb = to_rgb(Image.new(mode, (3, 2)))
    assert rgb.mode == "RGB" and rgb.size == (3, 2)


def test_to_rgb_returns_upright_rgb_unchanged_and_leaves_its_input_alone():
    image = Image.new("RGB", (3, 2), RED)
    assert to_rgb(image) is image
    rgba = Image.new("RGBA", (3, 2), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == WHITE
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (0, 0, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_use_the_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE, (0, 255, 0))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert decode_image(data).getpixel((8, 8)) == RED


def test_decoded_image_is_loaded_and_detached():
    decoded = decode_image(encode(two_colour_image(), "GIF"))
    assert getattr(decoded, "fp", None) is None
    assert decoded.getpixel((0, 0)) == RED


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "payload, name",
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS"),
        (b"\xc5\xd0\xd3\xc6" + b"\x00" * 28, "EPS"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b"8BPS\x00\x01" + b"\x00" * 20, "PSD"),
        (b"\x00\x00\x01\x00\x01\x00" + b"\x00" * 20, "ICO"),
        (b"\x00\x00\x02\x00\x01\x00" + b"\x00" * 20, "CUR or TGA"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20, "AVIF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20, "HEIC"),
    ],
)
def test_unsupported_formats_are_refused_before_decoding(monkeypatch, payload, name):
    monkeypatch.setattr(Image, "open", _fail_if_called)
    for value in (payload, base64.b64encode(payload), base64.b64encode(payload).decode()):
        with pytest.raises(ImageInputError) as raised:
            decode_image(value)
        assert raised.value.reason == f"unsupported format {name}"


@pytest.mark.parametrize("many", [False, True], ids=["one 2 MB chunk", "many 500 KB chunks"])
def test_a_png_whose_text_metadata_pillow_refuses_names_it_and_the_fix(many):
    """2 KB of PNG that inflate to megabytes of text chunks: Pillow refuses them, and the error
    says that it is the text metadata, not a corrupt image."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(140 if many else 1):  # 70 MB in all, over Pillow's 64 MB for text
        info.add_text(f"comment{i}", "x" * (500_000 if many else 2_000_000), zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG", pnginfo=info)
    with pytest.raises(ImageInputError) as raised:
        decode_image(buffer.getvalue())
    assert raised.value.reason.startswith("PNG text chunk larger than Pillow accepts")
    assert "without its text metadata" in str(raised.value)


def test_unsupported_media_type_in_data_uri_is_refused():
    payload = base64.b64encode(b"<svg/>").decode()
    with pytest.raises(ImageInputError, match="unsupported format SVG"):
        decode_image(f"data:image/svg+xml;base64,{payload}")
    with pytest.raises(ImageInputError, match="not base64-encoded"):
        decode_image("data:image/png,abcd")


def test_allowed_formats_are_the_only_ones_pillow_may_try(monkeypatch):
    seen = []
    real_open = Image.open

    def recording_open(fp, mode="r", formats=None):
        seen.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", recording_open)
    decode_image(encode(two_colour_image(), "PNG"))
    assert seen and set(seen[0]) <= set(decode_module.ALLOWED_FORMATS)
    assert "EPS" not in seen[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_refused(fmt, keep):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageInputError) as raised:
        decode_image(data[: int(len(data) * keep)])
    assert raised.value.reason.startswith(f"truncated or corrupt image ({fmt}")


def test_truncated_header_is_refused():
    data = encode(two_colour_image(), "PNG")[:20]
    with pytest.raises(ImageInputError, match="truncated or corrupt image"):
        decode_image(data)


def test_load_truncated_images_is_left_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "value",
    [
        np.random.default_rng(1).bytes(1000),
        b"\x00\x01\x02 not an image",
        "hello world",
        "not base64!",
        "a" * 9,  # base64 alphabet, impossible length
        "aGVsbG8gd29ybGQ=",  # valid base64 of b"hello world"
    ],
)
def test_non_images_are_refused(value):
    with pytest.raises(ImageInputError, match="not an image"):
        decode_image(value)


@pytest.mark.parametrize(
    "value, type_name",
    [(5, "int"), (None, "NoneType"), ({"image": b""}, "dict"), (3.5, "float"), ([b"x"], "list")],
)
def test_other_types_are_refused_by_name(value, type_name):
    with pytest.raises(ImageInputError) as raised:
        decode_image(value)
    assert raised.value.reason == f"unsupported input type {type_name}"


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "dtype float32"),
        (np.zeros((4, 4, 3), dtype=np.uint16), "dtype uint16"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape (4, 4, 2)"),
        (np.zeros((3, 4, 4, 3), dtype=np.uint8), "shape (3, 4, 4, 3)"),
        (np.zeros((4,), dtype=np.uint8), "shape (4,)"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty image"),
    ],
)
def test_bad_arrays_are_refused(array, problem):
    with pytest.raises(ImageInputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        decode_image(array)


def test_empty_inputs_are_refused():
    for value in (b"", "", "   ", bytearray()):
        with pytest.raises(ImageInputError, match="empty input"):
            decode_image(value)


def test_too_many_bytes_are_refused_before_decoding(monkeypatch):
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)), "PNG")
    limits = InputLimits(max_bytes=1000)
    monkeypatch.setattr(Image, "open", _fail_if_called)
    for value in (data, base64.b64encode(data), base64.b64encode(data).decode(), b"x" * 10_000_000):
        with pytest.raises(ImageInputError) as raised:
            decode_image(value, limits)
        assert raised.value.reason.startswith("too large: ")
        assert raised.value.reason.endswith(" bytes > limit 1000")
    with pytest.raises(ImageInputError, match=f"too large: {len(data)} bytes > limit 1000"):
        decode_image(data, limits)


def test_too_many_pixels_are_refused_before_load(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _fail_if_called)
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(png_header_claiming(30_000, 30_000))  # over twice Pillow's limit
    with pytest.raises(ImageInputError, match=r"too many pixels: 1200 \(40x30\) > limit 1000"):
        decode_image(encode(two_colour_image(), "PNG"), InputLimits(max_pixels=1000))
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(np.zeros((40, 30), dtype=np.uint8), InputLimits(max_pixels=1000))


@pytest.mark.parametrize("bomb_filter", ["error", "ignore"])
def test_pillow_decompression_bomb_warning_is_refused(monkeypatch, bomb_filter):
    # 1200 pixels: over Pillow's (patched) limit of 1000, under twice it, so Pillow only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter(bomb_filter, Image.DecompressionBombWarning)
        with pytest.raises(ImageInputError, match="too many pixels"):
            decode_image(encode(two_colour_image(), "PNG"), InputLimits(max_pixels=1000))


def test_pillow_decompression_bomb_error_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(encode(two_colour_image(), "PNG"), InputLimits(max_pixels=500))


def test_higher_pixel_limit_raises_pillows_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_image(encode(two_colour_image(), "PNG"), InputLimits(max_pixels=5000)).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 5000


@pytest.mark.parametrize(
    "value",
    [
        "/etc/passwd",
        b"/etc/passwd",
        "C:\\x.jpg",
        "C:/images/x.jpg",
        "\\\\server\\share\\x.jpg",
        "http://example.com/cat.jpg",
        "https://example.com/cat.jpg",
        "file:///etc/passwd",
        "file:/etc/passwd",
        "s3://bucket/cat.jpg",
        "gs://bucket/cat.png",
        "~/cat.jpg",
        "./cat.jpg",
        "../cat.jpg",
        "cat.jpg",
        "/home/jos\u00e9/cat.jpg",
        b"http://example.com/cat.jpg",
    ],
)
def test_paths_and_urls_are_never_opened(monkeypatch, tmp_path, value):
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(Image, "open", _fail_if_called)
    with pytest.raises(ImageInputError) as raised:
        decode_image(value)
    assert str(raised.value) == (
        "looks like a file path or URL; the model never reads paths or URLs, send the image bytes "
        "(see mlflow_clip.client.encode_image)"
    )
    assert opened == []


def test_a_real_file_path_is_not_read(monkeypatch, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(encode(two_colour_image(), "PNG"))
    monkeypatch.setattr(Image, "open", _fail_if_called)
    with pytest.raises(ImageInputError, match="looks like a file path or URL"):
        decode_image(str(path))


SECRET = base64.b64encode(b"SECRET-PAYLOAD-do-not-echo-" * 8).decode()


@pytest.mark.parametrize(
    "value",
    [
        SECRET,
        SECRET.encode(),
        SECRET + "!",
        "data:text/plain;base64," + SECRET,
        "data:image/png;base64," + SECRET,
        "data:image/png;base64," + SECRET + "!!",
        base64.b64encode(b"\xff\xd8\xff" + b"SECRET-PAYLOAD" * 20).decode(),
        base64.b64encode(b"%!PS-Adobe-3.0 SECRET-PAYLOAD").decode(),
        b"\x89PNG\r\n\x1a\nSECRET-PAYLOAD" * 4,
        "/SECRET-PAYLOAD/x.jpg",
    ],
)
def test_error_messages_never_echo_the_payload(value):
    with pytest.raises(ImageInputError) as raised:
        decode_image(value)
    text = str(raised.value) + repr(raised.value)
    assert SECRET[:16] not in text
    assert "SECRET" not in text


def test_image_input_error_reads_well_and_pickles():
    error = ImageInputError("truncated image", "send the whole file")
    assert isinstance(error, ValueError)
    assert str(error) == "truncated image; send the whole file"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.fix, str(copy)) == (error.reason, error.fix, str(error))


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_image_limits_are_validated(field, bad):
    with pytest.raises(ValueError, match=f"InputLimits.{field} must be a positive int"):
        InputLimits(**{field: bad})


def test_default_limits():
    limits = InputLimits()
    assert limits.max_bytes == 32 * 1024 * 1024
    assert limits.max_pixels == 50_000_000  # a 48 MP phone photo fits


def test_serving_modules_never_import_torch():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = sys.modules["torchvision"] = sys.modules["clip"] = None
        import numpy as np
        from mlflow_clip.serving.images import decode_image
        from mlflow_clip.serving.preprocess import Preprocessor
        print(Preprocessor(32)(decode_image(np.zeros((40, 50, 3), dtype=np.uint8))).shape)
        """
    )
    root = ROOT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(3, 32, 32)"


def _fail_if_called(*args, **kwargs):
    raise AssertionError("must not be called")
