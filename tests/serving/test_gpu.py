"""GPU environments are what they say: a model that runs on a GPU (fp16, or asking for CUDA or
TensorRT) requires onnxruntime-gpu; the load log says which provider serves, and a fallback is
one warning with the fix; provider options reach onnxruntime. No GPU here: what runs on one is
not measured, only what the model asks for and what a CPU-only machine does with it."""

from __future__ import annotations

import logging

import onnx
import pytest
import yaml

import mlflow_clip
from mlflow_clip.flavor import GPU_RUNTIME_FLOOR, get_default_pip_requirements, uses_gpu

CUDA_FIRST = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _requirements(model_dir) -> list[str]:
    return (model_dir / "requirements.txt").read_text().split()


def _with_precision(colour_onnx, tmp_path, precision: str):
    model = onnx.load(str(colour_onnx))
    for prop in model.metadata_props:
        if prop.key == "precision":
            prop.value = precision
    path = tmp_path / f"colour-{precision}.onnx"
    onnx.save(model, str(path))
    return path


def test_which_models_need_the_gpu_build():
    assert uses_gpu(precision="fp16") and uses_gpu(CUDA_FIRST) and uses_gpu(["TensorrtExecutionProvider"])
    assert not uses_gpu(["CPUExecutionProvider"]) and not uses_gpu(precision="int8")
    cpu, gpu = get_default_pip_requirements(), get_default_pip_requirements(providers=CUDA_FIRST)
    assert [r for r in cpu if r.startswith("onnxruntime")] == [next(r for r in cpu if r.startswith("onnxruntime=="))]
    assert GPU_RUNTIME_FLOOR in gpu and not any(r.startswith("onnxruntime==") for r in gpu)
    assert [r for r in cpu if not r.startswith("onnxruntime")] == [r for r in gpu if not r.startswith("onnxruntime")]


@pytest.mark.parametrize(("precision", "runtime"), [("fp16", None), ("fp32", {"providers": CUDA_FIRST})])
def test_a_gpu_models_environment_asks_for_onnxruntime_gpu(colour_onnx, tmp_path, precision, runtime):
    path = tmp_path / "model"
    mlflow_clip.save_model(_with_precision(colour_onnx, tmp_path, precision), path, runtime=runtime)
    requirements = _requirements(path)
    assert GPU_RUNTIME_FLOOR in requirements and not any(r.startswith("onnxruntime==") for r in requirements)
    conda = yaml.safe_load((path / "conda.yaml").read_text())
    assert GPU_RUNTIME_FLOOR in next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))


def test_a_cpu_model_keeps_the_cpu_build(colour_model_dir):
    assert any(r.startswith("onnxruntime==") for r in _requirements(colour_model_dir))
    assert not any(r.startswith("onnxruntime-gpu") for r in _requirements(colour_model_dir))


def test_the_load_log_names_the_provider_and_a_fallback_is_one_warning(colour_onnx, tmp_path, caplog):
    from mlflow_clip.serving import runtime

    path = tmp_path / "model"
    mlflow_clip.save_model(colour_onnx, path, runtime={"providers": CUDA_FIRST})
    runtime._WARNED_FALLBACKS.clear()
    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        first = mlflow_clip.load_model(str(path))
        mlflow_clip.load_model(str(path))  # the same fallback again: no second warning
    ours = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("mlflow_clip")]
    assert first.session.providers == ("CPUExecutionProvider",)
    assert len(ours) == 1, ours
    assert ours[0].startswith(
        "mlflow-clip: model.onnx asks for CUDAExecutionProvider first, but runs on CPUExecutionProvider"
    )
    assert "install onnxruntime-gpu in place of onnxruntime" in ours[0]
    assert "model.onnx runs on CPUExecutionProvider" in caplog.text
    # MLflow's own check says the environment lacks what the model requires
    assert "onnxruntime-gpu (current: uninstalled" in caplog.text


def test_provider_options_are_saved_overridable_and_handed_to_onnxruntime(colour_onnx, tmp_path, monkeypatch):
    import onnxruntime as ort

    options = {"CPUExecutionProvider": {"use_arena": "0"}, "CUDAExecutionProvider": {"device_id": 1}}
    path = tmp_path / "model"
    mlflow_clip.save_model(colour_onnx, path, runtime={"provider_options": options})
    conf = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["mlflow_clip"]["runtime"]
    assert conf["provider_options"] == options
    seen = []
    real = ort.InferenceSession

    def recording(model_path, session_options=None, providers=None, **kwargs):
        seen.append(providers)
        return real(model_path, session_options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    mlflow_clip.load_model(str(path))
    override = {"CPUExecutionProvider": {"use_arena": "1"}}
    mlflow_clip.load_model(str(path), model_config={"provider_options": override})
    assert seen == [[("CPUExecutionProvider", {"use_arena": "0"})], [("CPUExecutionProvider", {"use_arena": "1"})]]
    with pytest.raises(Exception, match="options per provider"):
        mlflow_clip.load_model(str(path), model_config={"provider_options": {"CPUExecutionProvider": "x"}})
