"""Runtime options that trade exactness for speed are explicit, measured and off unless chosen."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlflow_clip.serving.errors import SettingsError
from mlflow_clip.serving.images import decode_image
from mlflow_clip.serving.preprocess import Preprocessor
from mlflow_clip.serving.runtime import RuntimeSettings


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
    from helpers import demo_image_bytes

    images = demo_image_bytes(
        [(n, "JPEG") for n in ("a red circle", "a green square", "a blue triangle")] * 3, size=(1280, 960)
    )
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


@pytest.mark.parametrize("bad", [{"allow_spinning": "no"}, {"shards": -2}, {"shards": 1.5}])
def test_bad_shard_and_spinning_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RuntimeSettings.from_dict(bad)


def test_shard_count_is_one_unless_set():
    assert RuntimeSettings(intra_op_num_threads=3).shard_count == 1
    assert RuntimeSettings(intra_op_num_threads=3, runtime="openvino").shard_count == 1
    assert RuntimeSettings(intra_op_num_threads=3, shards=2).shard_count == 2


def test_environment_overrides_the_saved_config_that_mlflow_passes_back(demo_model_dir, monkeypatch):
    """MLflow hands `_load_pyfunc` the whole saved `python_function.config` (merged with the
    caller's model_config): values that merely repeat the saved ones must not hide the
    operator's MLFLOW_CLIP_* environment, and an explicit model_config still wins over it."""
    import mlflow

    monkeypatch.setenv("MLFLOW_CLIP_INTRA_OP_NUM_THREADS", "3")
    monkeypatch.setenv("MLFLOW_CLIP_JPEG_DRAFT", "true")
    monkeypatch.setenv("MLFLOW_CLIP_SHARDS", "2")
    loaded = mlflow.pyfunc.load_model(str(demo_model_dir))
    settings = loaded._model_impl.classifier.session.settings
    assert (settings.intra_op_num_threads, settings.jpeg_draft, settings.shards) == (3, True, 2)
    loaded = mlflow.pyfunc.load_model(str(demo_model_dir), model_config={"intra_op_num_threads": 1})
    settings = loaded._model_impl.classifier.session.settings
    assert (settings.intra_op_num_threads, settings.jpeg_draft) == (1, True)


def test_shards_give_the_same_rows_and_errors_as_one_run(demo_model_dir):
    """Splitting a request into concurrent shards (each decoding, then running its slice)
    changes neither the probabilities (at 1e-6) nor which rows fail, and the error still names
    every bad row across shards and chunks."""
    from helpers import demo_image_bytes

    import mlflow_clip

    images = [data for data, _ in demo_image_bytes([(n, "JPEG") for n in ("a red circle", "a blue square")] * 5)]
    rows = images[:3] + [b"not an image"] + images[3:8] + [b"\x00" * 10] + images[8:]
    one = mlflow_clip.load_model(str(demo_model_dir), model_config={"shards": 1})
    outputs = {}
    for shards, chunk in [(1, 32), (2, 32), (3, 32), (4, 5)]:
        model = mlflow_clip.load_model(str(demo_model_dir), model_config={"shards": shards, "chunk_size": chunk})
        assert model.session.settings.shards == shards
        outputs[shards] = model.predict(rows, on_error="null")
        with pytest.raises(ValueError, match=r"2 input row\(s\).*row 3:.*row 9:"):
            model.predict(rows)
    reference = np.array(outputs[1]["probabilities"].dropna().tolist())
    for frame in outputs.values():
        assert frame["probabilities"].isna().tolist() == [i in (3, 9) for i in range(len(rows))]
        assert frame["label"].tolist() == outputs[1]["label"].tolist()
        np.testing.assert_allclose(np.array(frame["probabilities"].dropna().tolist()), reference, atol=1e-6)
    assert one.predict(images)["label"].tolist() == outputs[2]["label"].dropna().tolist()


def test_every_setting_has_its_environment_variable():
    """Each field is overridable as MLFLOW_CLIP_<FIELD>, read by its type."""
    import dataclasses

    from mlflow_clip.serving.runtime import env_overrides

    texts = {"bool": ("yes", True), "int": ("7", 7), "str": ("openvino", "openvino"), "tuple": ("A, B", ("A", "B"))}
    texts["Mapping"] = ('{"CUDAExecutionProvider": {"device_id": 1}}', {"CUDAExecutionProvider": {"device_id": 1}})
    for f in dataclasses.fields(RuntimeSettings):
        text, value = texts[str(f.type).split("[")[0]]
        assert env_overrides({f"MLFLOW_CLIP_{f.name.upper()}": text}) == {f.name: value}, f.name
    with pytest.raises(SettingsError, match="provider_options that is not JSON"):
        env_overrides({"MLFLOW_CLIP_PROVIDER_OPTIONS": "device_id=1"})
    assert env_overrides({"MLFLOW_CLIP_JPEG_DRAFT": "  "}) == {}  # empty: not set


def test_one_truthiness_rule_for_the_environment_and_model_config(monkeypatch):
    from mlflow_clip.errors import SettingsError
    from mlflow_clip.serving.runtime import parse_setting

    for word in ("1", "true", "YES", "on"):
        assert parse_setting("allow_spinning", word) is True
    for word in ("0", "false", "No", "off"):
        assert parse_setting("jpeg_draft", word) is False
    with pytest.raises(SettingsError, match="expected one of"):
        parse_setting("jpeg_draft", "maybe")
    monkeypatch.setenv("MLFLOW_CLIP_ENABLE_CPU_MEM_ARENA", "on")
    settings = RuntimeSettings().with_overrides({"jpeg_draft": "yes", "allow_spinning": "off"})
    assert (settings.enable_cpu_mem_arena, settings.jpeg_draft, settings.allow_spinning) == (True, True, False)


def test_a_0_1_mlmodel_with_removed_settings_loads_with_a_warning_naming_each(caplog):
    from mlflow_clip.serving.manifest import read_mlmodel
    from tests.helpers import ROOT

    saved = read_mlmodel(ROOT / "tests" / "fixtures" / "demo-model-0.1.0")["flavors"]["mlflow_clip"]["runtime"]
    assert {"extra", "inter_op_num_threads", "graph_optimization_level"} <= set(saved)
    with caplog.at_level("WARNING", logger="mlflow_clip.serving.runtime"):
        settings = RuntimeSettings.from_dict(saved)
    assert settings.chunk_size == saved["chunk_size"]
    for key in ("extra", "inter_op_num_threads", "graph_optimization_level"):
        assert any(repr(key) in r.getMessage() and "no longer does anything" in r.getMessage() for r in caplog.records)
    assert "extra" not in settings.to_dict()
