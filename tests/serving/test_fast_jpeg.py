"""mlflow_clip.serving.fast_jpeg: Pillow's exact pixels from simplejpeg, or Pillow's own decode.

Every comparison is exact (`np.array_equal`): the fast path is used only because it gives the
same pixels, and so the same float32 inputs, bit for bit. Torch-free; images made here.
"""

from __future__ import annotations

import io
import logging

import costly_images as costly
import numpy as np
import pytest
from PIL import Image

from mlflow_clip.demo_data import make_photo_jpeg
from mlflow_clip.serving import decode, fast_jpeg
from mlflow_clip.serving.deadline import Deadline, DeadlineExceeded
from mlflow_clip.serving.images import ImageInputError
from mlflow_clip.serving.limits import InputLimits
from mlflow_clip.serving.preprocess import Preprocessor

LIMITS = InputLimits()


@pytest.fixture()
def pillow_only(monkeypatch):
    """This process with simplejpeg turned off (MLFLOW_CLIP_FAST_JPEG=0)."""
    monkeypatch.setenv(fast_jpeg.ENV_VAR, "0")
    fast_jpeg.fast_jpeg_status.cache_clear()
    yield
    monkeypatch.delenv(fast_jpeg.ENV_VAR)
    fast_jpeg.fast_jpeg_status.cache_clear()


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def pillow_pixels(data: bytes, draft: int | None = None) -> np.ndarray:
    """What serving decoded before the fast path: Pillow, upright, RGB."""
    opened = decode.open_encoded(data, LIMITS)
    return np.asarray(decode._pillow_decode(opened.image, opened, draft, decode.NO_DEADLINE))


def test_simplejpeg_is_checked_and_used_here():
    status = fast_jpeg.fast_jpeg_status()
    assert status.available, status.reason
    assert status.describe().startswith("simplejpeg (simplejpeg ") and "identical to Pillow" in status.reason


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("draft", [None, 112, 500], ids=["full", "draft", "draft larger than the image"])
def test_photos_decode_to_pillows_pixels_and_clips_inputs(orientation, draft):
    """Photo-like JPEGs, every EXIF orientation, full and DCT-scaled: the same upright pixels, and
    the same float32 model input to the last bit (native resize and Pillow's)."""
    data = with_exif_orientation(make_photo_jpeg(480, 320, orientation), orientation)
    opened = decode.open_encoded(data, LIMITS)
    fast = decode.decode_pixels(opened, draft)
    assert isinstance(fast, np.ndarray) and fast.flags.c_contiguous
    expected = pillow_pixels(data, draft)
    np.testing.assert_array_equal(fast, expected)
    for native in (True, False):
        preprocess = Preprocessor(224, native=native)
        np.testing.assert_array_equal(preprocess(fast), preprocess(Image.fromarray(expected)))


def test_gray_jpegs_stay_gray_and_finish_still_gives_rgb():
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8))
    buffer = io.BytesIO()
    gray.save(buffer, "JPEG", quality=85)
    data = buffer.getvalue()
    fast = decode.decode_pixels(decode.open_encoded(data, LIMITS))
    assert fast.shape == (40, 60)
    np.testing.assert_array_equal(fast, np.asarray(Image.open(io.BytesIO(data)).convert("L")))
    finished = decode.finish(decode.open_encoded(data, LIMITS))
    assert finished.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(finished), pillow_pixels(data))


@pytest.mark.parametrize(
    "build",
    [
        lambda: costly.jpeg_progressive_noise(64),
        lambda: costly.jpeg_cmyk(64),
        lambda: costly.encode(Image.new("RGB", (8, 8)), "PNG"),
    ],
    ids=["progressive", "CMYK", "PNG"],
)
def test_what_the_fast_path_leaves_to_pillow(build):
    """Progressive (no faster), CMYK (its own conversion) and other formats: Pillow decodes them."""
    opened = decode.open_encoded(build(), LIMITS)
    assert isinstance(decode.decode_pixels(opened), Image.Image)


def test_images_too_costly_for_one_call_go_to_pillow(monkeypatch):
    """A decode in one call checks no deadline inside: images estimated over FAST_MAX_MS are
    read by Pillow in 4 KB blocks, whose reads check it."""
    data = make_photo_jpeg(640, 480, 7)
    assert isinstance(decode.decode_pixels(decode.open_encoded(data, LIMITS)), np.ndarray)
    monkeypatch.setattr(fast_jpeg, "FAST_MAX_MS", decode.open_encoded(data, LIMITS).decode_ms - 1)
    assert isinstance(decode.decode_pixels(decode.open_encoded(data, LIMITS)), Image.Image)


def test_a_truncated_jpeg_is_refused_as_pillow_refuses_it():
    data = make_photo_jpeg(320, 240, 3)
    with pytest.raises(ImageInputError, match="truncated or corrupt image"):
        decode.decode_pixels(decode.open_encoded(data[: len(data) * 2 // 3], LIMITS))


def test_a_past_deadline_stops_before_the_decode():
    opened = decode.open_encoded(make_photo_jpeg(320, 240, 4), LIMITS)
    with pytest.raises(DeadlineExceeded, match="decoding an image"):
        decode.decode_pixels(opened, deadline=Deadline(at=0.0, seconds=1.0))


def test_without_simplejpeg_pillow_decodes_the_same_pixels(monkeypatch):
    monkeypatch.setattr(fast_jpeg, "_simplejpeg", None)
    fast_jpeg.fast_jpeg_status.cache_clear()
    try:
        assert fast_jpeg.fast_jpeg_status().describe() == "Pillow (simplejpeg is not installed)"
        data = make_photo_jpeg(320, 240, 5)
        decoded = decode.decode_pixels(decode.open_encoded(data, LIMITS))
        assert isinstance(decoded, Image.Image)
        np.testing.assert_array_equal(np.asarray(decoded), pillow_pixels(data))
    finally:
        fast_jpeg.fast_jpeg_status.cache_clear()


def test_the_environment_turns_it_off(pillow_only):
    assert fast_jpeg.fast_jpeg_status().describe() == f"Pillow ({fast_jpeg.ENV_VAR} turns it off)"
    assert isinstance(decode.decode_pixels(decode.open_encoded(make_photo_jpeg(64, 48, 6), LIMITS)), Image.Image)


def test_a_decoder_that_differs_from_pillow_is_not_used(monkeypatch, caplog):
    """The check at load is what makes the fast path safe: a decoder with another IDCT (here
    simplejpeg's fast DCT, a few levels off) is refused, with a warning naming the image."""
    import simplejpeg

    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(fast_jpeg._simplejpeg, "decode_jpeg", lambda *a, **k: real(*a, fastdct=True, **k))
    fast_jpeg.fast_jpeg_status.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mlflow_clip.serving.fast_jpeg"):
            status = fast_jpeg.fast_jpeg_status()
        assert not status.available and "differs from Pillow" in status.reason
        assert "Pillow decodes" in caplog.text
    finally:
        fast_jpeg.fast_jpeg_status.cache_clear()
