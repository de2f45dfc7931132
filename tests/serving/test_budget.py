"""Hostile input costs a bounded amount of work: decompression bombs refused from their headers,
a request's pixels summed before anything decodes, text refused before it is tokenized, prompts
bounded before the text encoder runs, a deadline that stops the work, caches bounded in bytes.

The bombs are made by `benchmarks/bombs.py`, as an attacker would send them."""

from __future__ import annotations

import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import encode, solid
from mlflow.exceptions import MlflowException
from PIL import Image

from benchmarks.bombs import BOMBS, lossless_webp_bomb
from mlflow_clip.serving.decode import DecodeBudget
from mlflow_clip.serving.images import ImageInputError, decode_image
from mlflow_clip.serving.limits import InputLimits

FAST = 1.0  # seconds: every refusal here must cost less than this


@pytest.fixture(scope="module")
def webp_bomb() -> bytes:
    return lossless_webp_bomb()


@pytest.mark.parametrize("name", list(BOMBS))
def test_decompression_bombs_are_refused_from_their_headers(name):
    data = BOMBS[name]()
    assert len(data) < 1000
    started = time.process_time()
    with pytest.raises(ImageInputError, match=r"too many pixels|decompression ratio too high") as info:
        decode_image(data)
    assert time.process_time() - started < FAST
    assert "max_pixels" in str(info.value)  # names the setting (max_pixels or max_pixels_per_byte)


def test_a_real_lossless_webp_bomb_is_refused_before_decoding(webp_bomb):
    assert len(webp_bomb) < 5000
    started = time.process_time()
    with pytest.raises(ImageInputError, match=r"decompression ratio too high: 5000x5000 pixels from \d+ bytes"):
        decode_image(webp_bomb)
    assert time.process_time() - started < 0.2  # the header only; decoding it costs about 0.3 s


def test_small_flat_images_and_a_48_mp_photo_still_decode():
    flat = encode(Image.new("RGB", (1600, 1200), (9, 9, 9)), "WEBP", lossless=True)  # 1.9 MP: under the ratio floor
    assert decode_image(flat).size == (1600, 1200)
    gradient = np.broadcast_to(np.linspace(0, 255, 8000, dtype=np.uint8)[None, :, None], (6000, 8000, 3))
    photo = encode(Image.fromarray(np.ascontiguousarray(gradient)), "JPEG", quality=90)
    assert decode_image(photo).size == (8000, 6000)  # 48 MP, as a phone takes them


def test_the_ratio_and_pixel_limits_are_settings(webp_bomb):
    loose = InputLimits(max_pixels_per_byte=100_000)
    assert decode_image(webp_bomb, loose).size == (5000, 5000)
    with pytest.raises(ImageInputError, match=r"> limit 1000000 \(max_pixels\)"):
        decode_image(encode(solid("red", (1200, 1000))), InputLimits(max_pixels=1_000_000))


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return mlflow.pyfunc.load_model(str(demo_model_dir))


def test_a_request_over_its_pixel_budget_decodes_nothing(demo, demo_model_dir):
    """Ten 30 MP images (real, cheap to send as flat JPEGs): 300 MP > 150 MP, refused up front."""
    big = encode(Image.new("RGB", (6000, 5000), (200, 20, 20)), "JPEG", quality=50)
    started = time.process_time()
    with pytest.raises(MlflowException, match=r"10 images with 300000000 pixels in all; expected at most 150000000"):
        demo.predict(pd.DataFrame({"image": [big] * 10}))
    assert time.process_time() - started < FAST


@pytest.mark.parametrize(
    "params, match",
    [
        ({"classes": ["x" * 100_000]}, r"Class 0 has 100000 characters; expected at most 1000 \(max_text_chars\)"),
        ({"classes": ["a cat"], "templates": "a photo of {} " + "y" * 10_000}, r"Template 0 has 10014 characters"),
        (
            {"classes": [f"class {i}" for i in range(200)], "templates": "ensemble"},
            r"16000 prompts; expected at most 2000",
        ),
    ],
    ids=["100 KB label", "10 KB template", "too many prompts"],
)
def test_text_budgets_refuse_before_tokenizing(demo, params, match):
    started = time.process_time()
    with pytest.raises(MlflowException, match=match):
        demo.predict(pd.DataFrame({"image": [encode(solid("red"))]}), params=params)
    assert time.process_time() - started < FAST


@pytest.mark.parametrize(
    "params",
    [
        {"classes": ["a cat", "a dog"], "templates": "@" + "q" * 100_000},
        {"output": "q" * 100_000},
        {"on_error": "q" * 100_000},
        {"classes": ["a cat," + "q" * 900, "a dog"]},
    ],
    ids=["@file template", "output", "on_error", "class with a comma"],
)
def test_a_refused_parameter_is_named_without_echoing_it(demo, params):
    """The message names the value by its first few characters only, however long it is."""
    with pytest.raises(MlflowException) as refused:
        demo.predict(pd.DataFrame({"image": [encode(solid("red"))]}), params=params)
    message = refused.value.message
    assert "q" * 40 not in message and len(message) < 400, message


def test_labels_longer_than_the_context_are_refused_unless_truncate(demo):
    """Two long labels sharing their first 77 tokens would both score 0.5: refused by default."""
    prefix = " ".join(["red"] * 80)
    params = {"classes": [prefix + " circle", prefix + " square"], "templates": "none"}
    frame = pd.DataFrame({"image": [encode(solid("red"))]})
    with pytest.raises(MlflowException, match=r"Class 0 with template 0 \(and 1 more\) is longer than CLIP's context"):
        demo.predict(frame, params=params)
    out = demo.predict(frame, params={**params, "truncate": True})
    np.testing.assert_allclose(out["probabilities"][0], [0.5, 0.5], atol=1e-6)  # what truncate=true means


def test_texts_that_are_not_text_are_row_errors(demo):
    for texts, row, reason in ([["a cat", None], 1, "missing"], [["a cat", 5], 1, "a int"], [["x" * 1001], 0, "1001"]):
        with pytest.raises(MlflowException, match=rf"row {row}: .*{reason}"):
            demo.predict(pd.DataFrame({"text": texts}))
    with pytest.raises(MlflowException, match="longer than CLIP's context"):
        demo.predict(pd.DataFrame({"text": ["word " * 100]}))


def test_a_request_past_its_deadline_stops(demo_model_dir):
    """With a 1 s deadline, a request of several seconds of decoding (600 decodes of 1080p, with
    the pixel and decoding budgets lifted so it is allowed) stops within about one chunk."""
    from mlflow_clip.demo_data import make_photo_jpeg

    config = {"deadline_seconds": 1, "chunk_size": 4, "max_request_pixels": 10**10, "max_request_decode_ms": 10**9}
    model = mlflow.pyfunc.load_model(str(demo_model_dir), model_config=config)
    photos = [make_photo_jpeg(1920, 1080, seed=i) for i in range(8)] * 75
    started = time.monotonic()
    with pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame({"image": photos}))
    assert info.value.error_code == "DEADLINE_EXCEEDED" and "1 s deadline" in info.value.message
    assert time.monotonic() - started < 3.0


def test_the_decode_budget_bounds_pixels_held_at_once():
    budget, held, peak, lock = DecodeBudget(1000), [0], [0], threading.Lock()

    def decode(pixels: int):
        share = min(pixels, budget.capacity)  # an image over the capacity holds all of it, alone
        with budget.hold(pixels):
            with lock:
                held[0] += share
                peak[0] = max(peak[0], held[0])
            time.sleep(0.01)
            with lock:
                held[0] -= share

    threads = [threading.Thread(target=decode, args=(p,)) for p in [400, 300, 600, 200, 900, 100] * 4 + [5000]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 1000 and budget.in_use == 0  # the 5000-pixel one ran alone, counted as the capacity


def test_caches_are_bounded_in_bytes():
    from mlflow_clip.serving.text import FeatureCache
    from mlflow_clip.serving.tokenizer import WordCache

    cache = FeatureCache(entries=64, max_bytes=10_000)
    for i in range(50):
        cache.put(bytes([i]) * 32, np.zeros((10, 100), np.float32))  # 4,000 bytes each
    assert len(cache) == 2 and cache.held <= 10_000
    words = WordCache(entries=1000, chars=100, word_chars=64)
    for i in range(100):
        words.put(f"word{i:03d}", (i,))
    words.put("x" * 1000, (1,))  # never cached: longer than any real word
    assert words.held <= 100 and words.get("x" * 1000) is None


def test_a_request_over_its_decoding_budget_decodes_nothing(demo):
    """Three 50 MP progressive JPEGs of 25 scans, each under max_decode_ms and together under
    max_request_pixels: about 5 CPU seconds of decoding, refused up front."""
    from costly_images import FULL_SIDE, jpeg_progressive_scans

    image = jpeg_progressive_scans(FULL_SIDE, 25)
    started = time.process_time()
    with pytest.raises(
        MlflowException, match=r"3 images that would take about \d+ ms of CPU to decode in all; expected"
    ):
        demo.predict(pd.DataFrame({"image": [image] * 3}))
    assert time.process_time() - started < FAST
