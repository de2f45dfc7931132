"""Runtime options that trade exactness for speed are explicit, measured and off unless chosen."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlflow_clip.images import decode_image
from mlflow_clip.preprocess import Preprocessor
from mlflow_clip.runtime import RuntimeSettings


def _photo_jpeg(size=(1600, 1000), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_draft_decoding_reduces_jpegs_but_never_below_the_input_size():
    data = _photo_jpeg((1600, 1000))
    assert decode_image(data).size == (1600, 1000)
    assert decode_image(data, draft_size=224).size == (400, 250)  # 1/4: 1/8 would leave 125 < 224
    assert decode_image(data, draft_size=64).size == (200, 125)  # 1/8
    assert decode_image(data, draft_size=600).size == (1600, 1000)  # 1/2 would leave 500 < 600


def test_draft_decoding_leaves_other_formats_alone():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (500, 800, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert np.array_equal(np.asarray(decode_image(buffer.getvalue(), draft_size=64)), np.asarray(image))


def test_draft_pixels_stay_close_to_the_exact_path():
    """The model input after draft decoding differs from the exact (CLIP-identical) input by a
    little: a smooth photo's normalized pixels move by well under one standard deviation."""
    data = _photo_jpeg()
    preprocessor = Preprocessor(224)
    exact = preprocessor(decode_image(data))
    draft = preprocessor(decode_image(data, draft_size=224))
    assert exact.shape == draft.shape
    assert 0 < np.abs(exact - draft).mean() < 0.05


def test_settings_read_draft_and_workers_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_CLIP_JPEG_DRAFT", "true")
    monkeypatch.setenv("MLFLOW_CLIP_DECODE_WORKERS", "3")
    settings = RuntimeSettings().with_overrides({})
    assert settings.jpeg_draft is True and settings.decode_workers == 3
    assert RuntimeSettings().jpeg_draft is False  # exact by default


def test_draft_is_a_load_time_choice_with_small_measured_effect(demo_model_dir):
    """Exact by default (bit-identical preprocessing); `jpeg_draft` through model_config changes
    the demo model's probabilities by at most 1e-2 and none of its labels."""
    import mlflow
    from conftest import demo_image_bytes

    images = demo_image_bytes([(n, "JPEG") for n in ("a red circle", "a green square", "a blue triangle")] * 3,
                              size=(1280, 960))
    frame = pd.DataFrame({"image": [data for data, _ in images]})
    exact_model = mlflow.pyfunc.load_model(str(demo_model_dir))
    draft_model = mlflow.pyfunc.load_model(str(demo_model_dir), model_config={"jpeg_draft": True})
    exact, draft = exact_model.predict(frame), draft_model.predict(frame)
    assert list(exact["label"]) == list(draft["label"]) == [name for _, name in images]
    difference = np.abs(np.array(exact["probabilities"].tolist()) - np.array(draft["probabilities"].tolist())).max()
    assert 0 < difference <= 1e-2


@pytest.mark.parametrize("bad", [{"jpeg_draft": "sometimes"}, {"decode_workers": -1}])
def test_bad_runtime_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RuntimeSettings.from_dict(bad)
