"""mlflow_clip.serving.preprocess against CLIP's own ``clip.clip._transform``: bit-for-bit (max abs diff 0.0).

Needs the export world (torch, torchvision, openai-clip) for the reference; skipped without it.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
import pytest
from PIL import Image

clip = pytest.importorskip("clip")
torch = pytest.importorskip("torch")
from clip.clip import _transform  # noqa: E402
from torchvision.transforms import functional as tv_functional  # noqa: E402

from mlflow_clip.serving import preprocess as preprocess_module  # noqa: E402
from mlflow_clip.serving.images import to_rgb  # noqa: E402
from mlflow_clip.serving.preprocess import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    SQUASH,
    Preprocessor,
    compute_crop_origin,
    compute_resized_size,
)

RESOLUTIONS = (64, 224, 288, 336)
SIZES = (  # (width, height): odd, tiny, extreme aspect ratios, smaller than, equal to and around n
    (1, 1),
    (2, 1),
    (3, 5),
    (65, 47),
    (223, 224),
    (225, 224),
    (224, 224),
    (224, 223),
    (299, 224),
    (301, 224),
    (336, 337),
    (1000, 31),
    (31, 1000),
    (640, 480),
    (4000, 17),
)


@functools.lru_cache(maxsize=None)
def clip_transform(resolution: int):
    return _transform(resolution)


@functools.lru_cache(maxsize=None)
def preprocessor(resolution: int) -> Preprocessor:
    return Preprocessor(resolution)


def clip_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    return clip_transform(resolution)(image).numpy()


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Uniform noise: the worst case for rounding (bicubic overshoots and clips everywhere)."""
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed + width * 7919 + height).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Exact parity


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rgb_matches_clip_exactly(size, resolution):
    image = Image.fromarray(noise(*size))
    np.testing.assert_array_equal(preprocessor(resolution)(image), clip_pixels(image, resolution))


@pytest.mark.parametrize("resolution", (224, 336))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gray_matches_clip_exactly(size, resolution):
    image = Image.fromarray(noise(*size, channels=1))
    assert image.mode == "L"
    ours = preprocessor(resolution)(image)
    np.testing.assert_array_equal(ours, clip_pixels(image, resolution))
    np.testing.assert_array_equal(ours, preprocessor(resolution)(image.convert("RGB")))


def test_decoded_jpeg_matches_clip_exactly():
    y, x = np.mgrid[0:1080, 0:1920]
    photo = np.stack([x * 255 // 1920, y * 255 // 1080, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    from mlflow_clip.serving.images import decode_image

    ours = preprocessor(224)(decode_image(buffer.getvalue()))
    np.testing.assert_array_equal(ours, clip_pixels(Image.open(io.BytesIO(buffer.getvalue())), 224))


def test_every_byte_value_normalises_like_torch():
    # 16x16 = 256 pixels, each channel holding every byte value once; no resize, no crop.
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))
    np.testing.assert_array_equal(Preprocessor(16)(image), clip_pixels(image, 16))


def test_custom_mean_and_std_match_torchvision_normalize():
    mean, std = (0.5, 0.25, 0.125), (0.3, 0.2, 0.1)
    image = Image.fromarray(noise(50, 40))
    reference = tv_functional.normalize(tv_functional.to_tensor(image), mean, std)
    ours = Preprocessor(40, mean, std)(image.crop((5, 0, 45, 40)))
    np.testing.assert_array_equal(ours, reference.numpy()[:, :, 5:45])


@pytest.mark.parametrize(
    "mode",
    ["P-transparent", "P", "RGBA", "LA", "CMYK", "I;16", "1", "F", "YCbCr", "LAB", "HSV"],
)
def test_other_modes_after_to_rgb_match_clip_exactly(mode):
    image = make_image(mode, 97, 61)
    rgb = to_rgb(image)
    for resolution in (64, 224):
        ours = preprocessor(resolution)(rgb)
        np.testing.assert_array_equal(ours, clip_pixels(rgb, resolution))
        np.testing.assert_array_equal(preprocessor(resolution)(image), ours)  # to_rgb built in


def test_we_deliberately_differ_from_clip_on_palette_and_alpha():
    """CLIP resizes first and converts to RGB last. Pillow then resizes "P" (and "1") images with
    nearest neighbour whatever filter was asked for, and drops alpha at the end: transparent areas
    come out black after a (premultiplied) resize, or as whatever colour hides under alpha=0 when
    no resize happens. We composite over white first, then resize bicubic like any RGB image."""
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255  # red everywhere ...
    rgba[:, 48:, 3] = 255  # ... but only the right half is opaque
    white, black, red = (
        Preprocessor(64)(Image.new("RGB", (1, 1), colour))[:, 0, 0]
        for colour in ((255, 255, 255), (0, 0, 0), (255, 0, 0))
    )
    image = Image.fromarray(rgba)  # at n=64 only cropped, at n=32 resized first
    np.testing.assert_array_equal(Preprocessor(64)(image)[:, 32, 2], white)
    np.testing.assert_array_equal(clip_pixels(image, 64)[:, 32, 2], red)
    np.testing.assert_array_equal(Preprocessor(32)(image)[:, 16, 1], white)
    np.testing.assert_array_equal(clip_pixels(image, 32)[:, 16, 1], black)

    palette = make_image("P", 97, 61)
    assert np.abs(Preprocessor(64)(palette) - clip_pixels(palette, 64)).max() > 0.5
    new_size = compute_resized_size(97, 61, 64)
    bicubic = palette.resize(new_size, Image.Resampling.BICUBIC)
    assert bicubic.tobytes() == palette.resize(new_size, Image.Resampling.NEAREST).tobytes()


# ----------------------------------------------------------------------------------------------
# Torchvision's integer arithmetic


def test_resized_size_matches_torchvision():
    rng = np.random.default_rng(3)
    sizes = [(w, h) for w, h in rng.integers(1, 5000, (2000, 2))] + [(w, h) for w in range(1, 40) for h in range(1, 40)]
    for width, height in sizes:
        for resolution in RESOLUTIONS:
            expected_h, expected_w = tv_functional._compute_resized_output_size((int(height), int(width)), [resolution])
            assert compute_resized_size(int(width), int(height), resolution) == (expected_w, expected_h)


def test_crop_origin_matches_torchvision_and_rounds_halves_to_even():
    assert compute_crop_origin(299, 224, 224) == (38, 0)  # 37.5 -> 38
    assert compute_crop_origin(301, 224, 224) == (38, 0)  # 38.5 -> 38, not 39
    assert compute_crop_origin(225, 227, 224) == (0, 2)  # 0.5 -> 0, 1.5 -> 2
    for width, height in [(w, h) for w in range(224, 240) for h in range(224, 240)]:
        grid = torch.arange(width * height).reshape(1, height, width)
        corner = int(tv_functional.center_crop(grid, [224])[0, 0, 0])
        assert compute_crop_origin(width, height, 224) == (corner % width, corner // width)


# ----------------------------------------------------------------------------------------------
# API and shapes


def test_batch_writes_every_image_like_single_calls():
    images = [Image.fromarray(noise(w, h, seed=i)) for i, (w, h) in enumerate([(300, 200), (64, 64), (31, 1000)])]
    images.append(Image.fromarray(noise(80, 90, channels=1)))
    batch = Preprocessor(64).batch(images)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index], clip_pixels(image, 64))
    assert Preprocessor(64).batch([]).shape == (0, 3, 64, 64)


def test_single_call_output():
    pixels = Preprocessor(224)(Image.new("RGB", (640, 480)))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32 and pixels.flags.c_contiguous


def test_resize_and_crop_shows_what_the_model_sees():
    seen = Preprocessor(224).resize_and_crop(Image.fromarray(noise(640, 480)))
    assert seen.mode == "RGB" and seen.size == (224, 224)


def test_preprocessor_is_a_frozen_hashable_value():
    assert Preprocessor(224) == Preprocessor(224, CLIP_MEAN, CLIP_STD, "bicubic")
    assert hash(Preprocessor(224)) == hash(Preprocessor(224, list(CLIP_MEAN), list(CLIP_STD)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Preprocessor(224).input_resolution = 336


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_resolution": 0}, "expected a positive int"),
        ({"input_resolution": 224.0}, "expected a positive int"),
        ({"input_resolution": True}, "expected a positive int"),
        ({"input_resolution": 224, "mean": (0.5, 0.5)}, "expected three numbers"),
        ({"input_resolution": 224, "std": ("a", 1, 1)}, "expected three numbers"),
        ({"input_resolution": 224, "std": (0.2, 0.0, 0.2)}, "must not contain 0"),
        ({"input_resolution": 224, "resample": "cubic"}, "expected one of"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocessor(**kwargs)


# ----------------------------------------------------------------------------------------------
# SigLIP's squash: both sides resized to the input size, nothing cropped


@functools.lru_cache(maxsize=None)
def squash_transform(resolution: int):
    """open_clip's eval transform for resize_mode="squash" (SigLIP's mean and std of 0.5)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((resolution, resolution), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )


@pytest.mark.parametrize("native", [True, False], ids=["native", "pillow"])
@pytest.mark.parametrize("resolution", (224, 256, 384))
def test_squash_matches_torchvisions_square_resize_exactly(resolution, native):
    squash = Preprocessor(resolution, (0.5,) * 3, (0.5,) * 3, resize_mode=SQUASH, native=native)
    for size in SIZES:
        for channels in (3, 1):
            image = Image.fromarray(noise(*size, channels=channels))
            expected = squash_transform(resolution)(image.convert("RGB")).numpy()
            assert np.abs(squash(image) - expected).max() == 0.0, (size, channels)
    assert compute_resized_size(640, 480, resolution, SQUASH) == (resolution, resolution)
    assert compute_crop_origin(resolution, resolution, resolution, SQUASH) == (0, 0)


# ----------------------------------------------------------------------------------------------
# Extreme aspect ratios


def test_extreme_aspect_ratios_do_not_build_a_gigantic_intermediate():
    # CLIP would resize 200000x2 to 22400000x224 (5 G pixels, ~20 GB) before cropping.
    for size in [(200_000, 2), (2, 200_000)]:
        pixels = Preprocessor(224)(Image.fromarray(noise(*size)))
        assert pixels.shape == (3, 224, 224) and np.isfinite(pixels).all()


@pytest.mark.parametrize("size", [(1000, 31), (31, 1000), (640, 480), (13, 997)], ids=str)
def test_crop_region_fallback_stays_within_two_levels_of_clip(monkeypatch, size):
    monkeypatch.setattr(preprocess_module, "MAX_EXACT_RESIZED_PIXELS", 0)
    image = Image.fromarray(noise(*size))
    difference = np.abs(Preprocessor(224)(image) - clip_pixels(image, 224))
    assert difference.max() <= 2 / 255 / min(CLIP_STD) + 1e-6
    assert (difference > 0).mean() < 0.01


# ----------------------------------------------------------------------------------------------
# Test images in other modes


def make_image(mode: str, width: int, height: int) -> Image.Image:
    rgb = Image.fromarray(noise(width, height, seed=5))
    if mode == "P-transparent":
        palette = rgb.quantize(64)
        palette.info["transparency"] = 0
        return palette
    if mode == "P":
        return rgb.quantize(64)
    if mode == "RGBA":
        alpha = Image.fromarray(noise(width, height, channels=1, seed=6))
        return Image.merge("RGBA", (*rgb.split(), alpha))
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), Image.fromarray(noise(width, height, 1, seed=7))))
    if mode == "I;16":
        return Image.fromarray(noise(width, height, channels=1).astype(np.uint16) * 257)
    if mode == "F":
        return Image.fromarray(noise(width, height, channels=1).astype(np.float32) / 255)
    return rgb.convert(mode)
