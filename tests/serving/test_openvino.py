"""OpenVINO as a runtime choice: chosen in MLmodel, overridable at load, logged, and refused or
replaced by onnxruntime (as the model needs) when OpenVINO is not installed.

Tolerance: OpenVINO f32 and onnxruntime run the same fp32 graph; their probabilities agree
within 1e-4 (measured 2e-6 on RN50 with random weights, less on the tiny models here).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import BLOCK_TORCH, encode, has_module, solid

import mlflow_clip

requires_openvino = pytest.mark.skipif(not has_module("openvino"), reason='needs pip install ".[openvino]"')
RUNTIME_TOL = 1e-4
COLOURS = ["red", "green", "blue"]

# Prepended to scripts that run as on a machine without OpenVINO (and without torch).
BLOCK_OPENVINO = BLOCK_TORCH.replace('{"torch", "torchvision", "clip"}', '{"torch", "torchvision", "clip", "openvino"}')


def _images():
    return pd.DataFrame({"image": [encode(solid(c)) for c in COLOURS * 3]})


def _probabilities(model, data) -> np.ndarray:
    return np.stack(model.predict(data)["probabilities"].to_numpy())


@requires_openvino
def test_runtime_override_switches_onnxruntime_and_openvino(colour_model_dir, caplog):
    import mlflow

    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        default = mlflow.pyfunc.load_model(str(colour_model_dir))
    assert "runtime onnxruntime" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        openvino = mlflow.pyfunc.load_model(str(colour_model_dir), model_config={"runtime": "openvino"})
    assert "runtime OpenVINO" in caplog.text and "inference precision f32" in caplog.text
    assert openvino.get_raw_model().session.runtime == "openvino"
    assert default.get_raw_model().session.runtime == "onnxruntime"
    data = _images()
    out_default, out_openvino = default.predict(data), openvino.predict(data)
    assert list(out_openvino["label"]) == list(out_default["label"]) == COLOURS * 3
    np.testing.assert_allclose(_probabilities(openvino, data), _probabilities(default, data), atol=RUNTIME_TOL)


@requires_openvino
def test_runtime_saved_in_mlmodel_and_overridden_by_the_environment(colour_onnx, tmp_path, monkeypatch):
    from mlflow.models import Model

    path = tmp_path / "model"
    mlflow_clip.save_model(colour_onnx, path, runtime={"runtime": "openvino"})
    flavor = Model.load(str(path)).flavors["mlflow_clip"]
    assert flavor["runtime"]["runtime"] == "openvino"
    assert any(line.startswith("openvino==") for line in (path / "requirements.txt").read_text().splitlines())
    assert mlflow_clip.load_model(str(path)).session.runtime == "openvino"
    monkeypatch.setenv("MLFLOW_CLIP_RUNTIME", "onnxruntime")
    assert mlflow_clip.load_model(str(path)).session.runtime == "onnxruntime"
    # model_config, on top of the environment, for a model saved with the default runtime
    monkeypatch.setenv("MLFLOW_CLIP_RUNTIME", "openvino")
    assert mlflow_clip.load_model(str(path), model_config={"runtime": "onnxruntime"}).session.runtime == "onnxruntime"


def test_default_model_requires_no_openvino(colour_model_dir):
    requirements = (colour_model_dir / "requirements.txt").read_text().splitlines()
    assert not any(line.startswith("openvino") for line in requirements)
    assert any(line.startswith("onnxruntime==") for line in requirements)


def test_unknown_runtime_is_a_clear_error(colour_model_dir):
    from mlflow.exceptions import MlflowException

    with pytest.raises(
        MlflowException, match=r"Received runtime='tensorrt'; expected one of \['onnxruntime', 'openvino', 'auto'\]"
    ):
        mlflow_clip.load_model(str(colour_model_dir), model_config={"runtime": "tensorrt"})


def _run_without_openvino(script: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(BLOCK_OPENVINO + script)
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)


def test_fp32_model_falls_back_to_onnxruntime_without_openvino(colour_onnx, tmp_path):
    path = tmp_path / "model"
    mlflow_clip.save_model(colour_onnx, path, runtime={"runtime": "openvino"})
    images = [encode(solid(c)) for c in COLOURS]
    script = f"""
import logging, mlflow, pandas as pd
logging.basicConfig(level=logging.INFO)
model = mlflow.pyfunc.load_model({str(path)!r})
print("LABELS", list(model.predict(pd.DataFrame({{"image": {images!r}}}))["label"]))
"""
    done = _run_without_openvino(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LABELS ['red', 'green', 'blue']" in done.stdout
    assert "OpenVINO is not installed" in done.stderr and "falling back to onnxruntime" in done.stderr
    assert 'pip install "mlflow-clip[openvino]"' in done.stderr
    assert "runtime onnxruntime" in done.stderr


def test_bf16_model_without_openvino_refuses_naming_the_fix(colour_onnx, tmp_path):
    """A bf16 model needs OpenVINO: one line naming the install, and the explicit way out."""
    from dataclasses import replace

    from mlflow_clip.serving.contract import ClassifierConfig

    path = tmp_path / "model"
    mlflow_clip.save_model(colour_onnx, path, runtime={"runtime": "openvino"})
    # A bf16 model is the fp32 graph with precision bf16 in its config: rewrite the config (the
    # manifest check, which would catch the edit, is skipped below).
    replace(ClassifierConfig.read(path), precision="bf16").write(path)
    images = [encode(solid(c)) for c in COLOURS]
    script = f"""
import mlflow, pandas as pd
try:
    mlflow.pyfunc.load_model({str(path)!r}, model_config={{"verify": False}})
except Exception as e:
    print("REFUSED", type(e).__name__, str(e))
model = mlflow.pyfunc.load_model({str(path)!r}, model_config={{"verify": False, "runtime": "onnxruntime"}})
print("LABELS", list(model.predict(pd.DataFrame({{"image": {images!r}}}))["label"]))
"""
    done = _run_without_openvino(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    refused = [line for line in done.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 1, done.stdout
    assert "RuntimeUnavailableError" in refused[0] and "precision is bf16, which needs OpenVINO" in refused[0]
    assert 'pip install "mlflow-clip[openvino]" (or pip install openvino)' in refused[0]
    assert '{"runtime": "onnxruntime"}' in refused[0]
    assert "LABELS ['red', 'green', 'blue']" in done.stdout
    assert "computes in fp32, not bf16" in done.stderr
