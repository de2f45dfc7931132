"""The synthetic demo images (torch-free): determinism, sizes, balance, placement, folders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mlflow_clip.demo_data import (
    BACKGROUND_MIN,
    COLOURS,
    DEMO_CLASSES,
    SHAPES,
    VARIED_SIDE_RANGE,
    draw_image,
    draw_samples,
    write_image_folder,
)

ODD_SIZES = [(8, 8), (37, 200), (200, 37), (65, 47), (64, 64), (333, 101), (97, 401), (640, 480), (1920, 1080)]


def shape_mask(image: Image.Image) -> np.ndarray:
    """Pixels of the shape: every shape colour has a dark channel, the background has none."""
    return np.asarray(image).min(axis=2) < BACKGROUND_MIN - 20


def test_class_names_are_colour_major():
    assert COLOURS == ("red", "green", "blue")
    assert SHAPES == ("circle", "square", "triangle")
    assert DEMO_CLASSES[:4] == ("a red circle", "a red square", "a red triangle", "a green circle")
    assert len(DEMO_CLASSES) == len(set(DEMO_CLASSES)) == 9


def test_same_seed_same_images_other_seed_other_images():
    first = draw_samples(12, seed=3, sizes=None)
    again = draw_samples(12, seed=3, sizes=None)
    other = draw_samples(12, seed=4, sizes=None)
    assert [(img.size, img.tobytes(), label) for img, label in first] == [
        (img.size, img.tobytes(), label) for img, label in again
    ]
    assert [img.tobytes() for img, _ in first] != [img.tobytes() for img, _ in other]
    assert draw_image("blue", "square", rng=5).tobytes() == draw_image("blue", "square", rng=5).tobytes()


@pytest.mark.parametrize("size", ODD_SIZES)
def test_size_and_mode_are_honoured(size):
    image = draw_image("green", "triangle", size=size, rng=0)
    assert image.size == size
    assert image.mode == "RGB"


def test_draw_samples_sizes_fixed_listed_and_varied():
    assert {img.size for img, _ in draw_samples(9, seed=1)} == {(64, 64)}
    assert {img.size for img, _ in draw_samples(9, seed=1, sizes=(90, 30))} == {(90, 30)}
    listed = [(65, 47), (97, 401)]
    assert {img.size for img, _ in draw_samples(20, seed=1, sizes=listed)} <= set(listed)
    low, high = VARIED_SIDE_RANGE
    varied = {img.size for img, _ in draw_samples(18, seed=1, sizes=None)}
    assert len(varied) > 10
    assert all(low <= side <= high for size in varied for side in size)


@pytest.mark.parametrize("n", [9, 90, 50])
def test_classes_are_balanced(n):
    counts = Counter(label for _, label in draw_samples(n, seed=2))
    assert set(counts) == set(range(9))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == n


def test_labels_match_the_drawn_colour():
    for image, label in draw_samples(27, seed=6, sizes=None):
        pixels = np.asarray(image)[shape_mask(image)]
        assert COLOURS[int(pixels.mean(axis=0).argmax())] == DEMO_CLASSES[label].split()[1]


@pytest.mark.parametrize("seed", range(2))
def test_shape_lies_inside_the_centre_square_on_a_light_background(seed):
    rng = np.random.default_rng(seed)
    for size in ODD_SIZES[1:-1] + [tuple(int(v) for v in rng.integers(48, 400, 2)) for _ in range(6)]:
        for colour in COLOURS:
            for shape in SHAPES:
                image = draw_image(colour, shape, size=size, rng=rng)
                width, height = size
                side = min(width, height)
                left, top = (width - side) / 2, (height - side) / 2
                mask = shape_mask(image)
                ys, xs = np.nonzero(mask)
                assert len(xs), (colour, shape, size)
                assert xs.min() >= left + 1 and xs.max() <= left + side - 2, (colour, shape, size)
                assert ys.min() >= top + 1 and ys.max() <= top + side - 2, (colour, shape, size)
                extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
                assert 0.15 * side <= extent <= 0.75 * side, (colour, shape, size, extent)
                assert np.asarray(image)[~mask].min() >= BACKGROUND_MIN


def test_unknown_names_and_tiny_sizes_are_rejected():
    with pytest.raises(ValueError, match="colour"):
        draw_image("purple", "circle")
    with pytest.raises(ValueError, match="shape"):
        draw_image("red", "hexagon")
    with pytest.raises(ValueError, match="too small"):
        draw_image("red", "circle", size=(4, 100))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_write_image_folder_layout(tmp_path, fmt):
    root = write_image_folder(tmp_path / "data", n_per_class=2, seed=0, size=(50, 70), fmt=fmt)
    assert root == tmp_path / "data"
    assert sorted(p.name for p in root.iterdir()) == sorted(DEMO_CLASSES)
    for name in DEMO_CLASSES:
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == [f"0001.{fmt}", f"0002.{fmt}"]
        with Image.open(root / name / files[0]) as image:
            assert image.size == (50, 70)


def test_write_image_folder_varied_sizes(tmp_path):
    root = write_image_folder(tmp_path, n_per_class=1, seed=1, size=None)
    sizes = set()
    for path in root.glob("*/*.png"):
        with Image.open(path) as image:
            sizes.add(image.size)
    assert len(list(root.glob("*/*.png"))) == 9
    assert len(sizes) > 1
