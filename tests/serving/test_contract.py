"""The model directory is the whole contract: every file that decides a prediction is in the
manifest, each tampered file is refused at load naming it, and models saved by 0.1.0 still load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import BLOCK_TORCH, ROOT, encode, solid, subprocess_env
from mlflow.exceptions import MlflowException
from tampering import TAMPERING, swap_classes

import mlflow_clip
from mlflow_clip.serving.manifest import build_manifest, read_mlmodel, verify_manifest

FROZEN = ROOT / "tests" / "fixtures" / "demo-model-0.1.0"
SAMPLES = ROOT / "mlflow_clip" / "assets" / "sample_images"
TOL = 1e-6


@pytest.fixture()
def demo_copy(demo_model_dir, tmp_path) -> Path:
    """A private copy of the saved demo model (with its text encoder), free to tamper with."""
    return Path(shutil.copytree(demo_model_dir, tmp_path / "model"))


def test_manifest_covers_every_file_that_decides_a_prediction(demo_model_dir):
    mlmodel = read_mlmodel(demo_model_dir)
    manifest = mlmodel["flavors"]["mlflow_clip"]["manifest"]
    files = set(manifest["files"])
    package = mlmodel["flavors"]["mlflow_clip"]["serving_package"]
    code = {f"code/{package}/{p.name}" for p in (demo_model_dir / "code" / package).glob("*.py")}
    assert code and code <= files
    assert {
        "model.onnx",
        "text_encoder.onnx",
        "bpe_simple_vocab_16e6.txt.gz",
        "clip_classifier.json",
        "reference/predictions.json",
    } <= files
    assert f"code/{package}/resample.c" in files  # the native resize's source, and its binary:
    assert any(name.startswith(f"code/{package}/_mlflow_clip_resample") for name in files)
    # the environment files MLflow itself rewrites are not covered; MLmodel is, as canonical data
    assert not files & {"requirements.txt", "conda.yaml", "python_env.yaml", "MLmodel"}
    assert len(manifest["mlmodel"]) == 64
    assert verify_manifest(demo_model_dir) == []
    assert build_manifest(demo_model_dir, mlmodel) == manifest


@pytest.mark.parametrize("how", list(TAMPERING))
def test_each_tampered_file_is_refused_at_load_naming_it(demo_copy, how):
    expected = TAMPERING[how](demo_copy)
    for load in (mlflow.pyfunc.load_model, mlflow_clip.load_model):
        with pytest.raises(MlflowException) as info:
            load(str(demo_copy))
        assert expected in info.value.message, info.value.message
        assert "does not match the manifest" in info.value.message and "verify" in info.value.message


def test_rewriting_what_mlflow_may_rewrite_is_not_tampering(demo_copy):
    """Re-serializing MLmodel changes nothing that decides a prediction; the requirements files are
    MLflow's (mlflow.models.update_model_requirements edits them)."""
    mlmodel = read_mlmodel(demo_copy)
    (demo_copy / "MLmodel").write_text(yaml.safe_dump(mlmodel, default_flow_style=True, width=60))
    mlflow.models.update_model_requirements(str(demo_copy), "add", ["requests"])
    assert "requests" in (demo_copy / "requirements.txt").read_text()
    assert verify_manifest(demo_copy) == []
    mlflow_clip.load_model(str(demo_copy))


def test_verification_can_be_turned_off_for_models_edited_on_purpose(demo_copy, monkeypatch, caplog):
    swap_classes(demo_copy)
    classifier = mlflow_clip.load_model(str(demo_copy), model_config={"verify": False})
    assert classifier.classes[0] == "a blue triangle"
    assert "without checking it against its manifest" in caplog.text
    monkeypatch.setenv("MLFLOW_CLIP_VERIFY", "0")
    assert mlflow.pyfunc.load_model(str(demo_copy)).predict(pd.DataFrame({"image": [encode(solid("red"))]})) is not None


def test_graphs_with_external_data_are_refused_at_save(demo_built, tmp_path):
    import onnx

    model = onnx.load(str(demo_built.onnx_path))
    onnx.save_model(
        model, str(tmp_path / "split.onnx"), save_as_external_data=True, location="split.onnx.data", size_threshold=0
    )
    with pytest.raises(MlflowException, match="keep their data in side files"):
        mlflow_clip.save_model(tmp_path / "split.onnx", tmp_path / "model")


def test_a_text_encoder_reading_outside_the_model_is_a_short_error(demo_copy, tmp_path):
    """With verification off, onnxruntime still refuses external data outside the model; the
    client gets a short error without a stack trace or the path."""
    import onnx

    graph = onnx.load(str(demo_copy / "text_encoder.onnx"))
    tensor = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "secret.bin").write_bytes(tensor.raw_data)  # next to the model directory, not in it
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (demo_copy / "text_encoder.onnx").write_bytes(graph.SerializeToString())
    model = mlflow.pyfunc.load_model(str(demo_copy), model_config={"verify": False})
    with pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame({"image": [encode(solid("red"))]}), params={"classes": ["a cat", "a dog"]})
    assert "text encoder" in info.value.message and "cannot be loaded" in info.value.message
    assert str(tmp_path) not in info.value.message and "Traceback" not in info.value.message
    assert info.value.error_code == "INTERNAL_ERROR"


def test_two_models_with_the_same_serving_code_in_one_process(demo_model_dir, tmp_path):
    """The first model's directory is gone (a temporary download) when the second is loaded: the
    shared copy of the serving code must not need it."""
    script = textwrap.dedent(
        f"""
        import shutil, mlflow, pandas as pd
        first = shutil.copytree({str(demo_model_dir)!r}, {str(tmp_path / "first")!r})
        mlflow.pyfunc.load_model(first)
        shutil.rmtree(first)
        model = mlflow.pyfunc.load_model({str(demo_model_dir)!r})
        images = pd.DataFrame({{"image": [open({str(SAMPLES / "01-red-circle-65x47.jpg")!r}, "rb").read()]}})
        print("LABEL", model.predict(images, params={{"classes": ["a red circle", "a blue square"]}})["label"][0])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LABEL a red circle" in result.stdout


def test_loading_a_model_keeps_every_library_module_importable(colour_model_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import mlflow, sys
        mlflow.pyfunc.load_model({str(colour_model_dir)!r})
        import mlflow_clip.registry, mlflow_clip.evaluation, mlflow_clip.spark, mlflow_clip.cli, mlflow_clip.flavor
        import mlflow_clip
        assert not mlflow_clip.__file__.startswith({str(colour_model_dir)!r}), mlflow_clip.__file__
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_a_model_saved_by_0_1_0_still_loads_and_predicts_without_torch(tmp_path):
    """The frozen fixture: saved by mlflow-clip 0.1.0 (code/mlflow_clip, no manifest). Its
    probabilities on the sample images must be those 0.1.0 computed."""
    expected = json.loads((FROZEN.parent / "demo-model-0.1.0.expected.json").read_text())
    model_dir = Path(shutil.copytree(FROZEN, tmp_path / "model"))
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import json, mlflow, pandas as pd
        from pathlib import Path
        samples = Path({str(SAMPLES)!r})
        names = {expected["images"]!r}
        model = mlflow.pyfunc.load_model({str(model_dir)!r})
        out = model.predict(pd.DataFrame({{"image": [(samples / n).read_bytes() for n in names]}}))
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        result = {{"labels": list(out["label"]), "probabilities": [list(p) for p in out["probabilities"]]}}
        print("RESULT " + json.dumps(result))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert got["labels"] == expected["labels"]
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=TOL)


def test_the_installed_library_loads_a_0_1_0_model_too():
    expected = json.loads((FROZEN.parent / "demo-model-0.1.0.expected.json").read_text())
    classifier = mlflow_clip.load_model(str(FROZEN))
    out = classifier.predict([(SAMPLES / name).read_bytes() for name in expected["images"]])
    np.testing.assert_allclose(np.stack(out["probabilities"]), expected["probabilities"], atol=TOL)


def test_the_model_names_its_resize_path_when_loaded(colour_model_dir, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        mlflow.pyfunc.load_model(str(colour_model_dir))
    line = next(r.getMessage() for r in caplog.records if "image resize:" in r.getMessage())
    assert "the model's own code" in line and ("native (" in line or "Pillow (" in line)


def test_reference_predictions_are_those_the_model_gives(demo_model_dir):
    from mlflow_clip.references import compare_with_reference, read_reference, run_probe

    reference = read_reference(demo_model_dir)
    assert len(reference["images"]) == 12 and "per_request" in reference
    probe = run_probe(demo_model_dir, reference)
    assert compare_with_reference(reference, probe, tolerance=1e-6) == []
    # "01-red-circle-65x47.jpg" shows "a red circle"; the demo model gets all but the gray one
    truth = ["a " + " ".join(name.split("-")[1:3]) for name in reference["images"]]
    assert sum(row["label"] == want for row, want in zip(reference["baked"], truth)) >= 11
