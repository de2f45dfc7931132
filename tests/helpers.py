"""Helpers the tests share: tiny purpose-built models and images made here, servers started and
stopped, MLflow pointed at a store. A plain module (`from helpers import ...`); the fixtures built
on it are in conftest.py."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


COLOUR_CLASSES = ["red", "green", "blue"]


COLOUR_RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


requires_export = pytest.mark.skipif(
    not (has_module("torch") and has_module("clip")), reason="needs the export extra: pip install '.[export]'"
)


# Exports of the other model families (open_clip, SigLIP, multilingual, Hugging Face folders) take
# 10 to 30 s each: the full suite runs them; the fast tier keeps their specs, preprocessing and
# tokenizers, and exports the demo CLIP end to end.
family_export = pytest.mark.slow


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid(colour: str, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, COLOUR_RGB[colour])


def build_colour_onnx(path: Path, resolution: int = 32) -> Path:
    """A hand-built ONNX 'classifier' that tells red, green and blue images apart: it averages
    each channel and scores classes with a fixed matrix. With mlflow-clip's metadata, it stands
    in for an exported CLIP where the test is about the flavor, not about CLIP."""
    import onnx
    from onnx import TensorProto, helper

    from mlflow_clip.serving.contract import ClassifierConfig, edge_output_name
    from mlflow_clip.serving.preprocess import CLIP_MEAN, CLIP_STD

    output = edge_output_name(COLOUR_CLASSES)
    weights = (np.eye(3, dtype=np.float32) * 20.0).astype(np.float32)  # channel mean -> class logit
    nodes = [
        helper.make_node("ReduceMean", ["image-"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [output], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("image-", TensorProto.FLOAT, ["batch", 3, resolution, resolution])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 3], weights.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    config = ClassifierConfig(
        classes=COLOUR_CLASSES,
        clip_model="colour-test",
        input_resolution=resolution,
        mean=list(CLIP_MEAN),
        std=list(CLIP_STD),
        logit_scale=20.0,
        output_name=output,
        opset=13,
    )
    helper.set_model_props(model, config.to_metadata_props())
    onnx.save(model, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without the active run, and with a registry that follows the tracking
    store named in `extra`."""
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    # MLflow starts `uvicorn` and `python` by name: this interpreter's bin/ comes first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if "MLFLOW_TRACKING_URI" in extra:
        env.pop("MLFLOW_REGISTRY_URI", None)
    env.update(extra)
    return env


def demo_image_bytes(classes_and_formats, seed: int = 123, size=(150, 110)):
    """(encoded bytes, class name) pairs of freshly drawn demo images."""
    import numpy as np

    from mlflow_clip.demo_data import draw_image

    rng = np.random.default_rng(seed)
    out = []
    for name, fmt in classes_and_formats:
        _, colour, shape = name.split()
        out.append((encode(draw_image(colour, shape, size=size, rng=rng), fmt), name))
    return out


def require_env_manager(env_manager: str, model_dir: Path) -> None:
    """Skip, saying why, where MLflow cannot build `env_manager`'s environment for the model here:
    uv not installed, or (virtualenv) no pyenv with the model's Python."""
    import shutil
    import subprocess
    import sys

    import yaml

    if env_manager == "uv":
        if shutil.which("uv", path=str(Path(sys.executable).parent)) is None and shutil.which("uv") is None:
            pytest.skip("uv is not installed (pip install uv; it is in the test extra)")
    elif shutil.which("pyenv") is None:
        pytest.skip("the virtualenv env manager needs pyenv")
    else:
        python = yaml.safe_load((Path(model_dir) / "python_env.yaml").read_text())["python"]
        versions = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
        if python not in versions:
            pytest.skip(f"pyenv has no Python {python} (installing it needs the internet)")


def start_server(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None):
    """Start a server process whose output goes to a file (a pipe nobody reads would fill up
    and block it)."""
    import subprocess

    with open(log_path, "w") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    process.log_path = log_path
    return process


def wait_for_http(url: str, process, timeout: float = 180) -> None:
    """Poll `url` until it answers 200; fail early with the process's output if it exits."""
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_path = getattr(process, "log_path", None)
            output = Path(log_path).read_text(errors="replace") if log_path else ""
            raise RuntimeError(f"the server exited early:\n{output[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_process(process, timeout: float = 20) -> None:
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


@contextlib.contextmanager
def exported_in_store(folder: Path, experiment: str, registered_model_name: str, **export):
    """`export_and_register(**export)` into a fresh SQLite store under `folder`; yields (result,
    run, registered version, the model downloaded to a local folder), then resets both URIs."""
    import mlflow
    from stores import fresh_sqlite_uri

    from mlflow_clip.export.job import export_and_register

    uri = fresh_sqlite_uri(folder / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = mlflow.create_experiment(experiment, str(folder / "artifacts"))
    try:
        # An explicit run, not set_experiment: no active experiment outlives this store.
        with mlflow.start_run(experiment_id=experiment_id):
            result = export_and_register(registered_model_name=registered_model_name, **export)
        client = mlflow.MlflowClient()
        version = client.get_model_version(registered_model_name, result.model_version)
        local = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(folder / "model"))
        yield result, client.get_run(result.run_id), version, local
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@contextlib.contextmanager
def using_store(uri: str):
    """Point MLflow (its globals and the MLFLOW_*_URI variables it mirrors them into) at `uri`
    for the block, then put both back."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI"))


# Prepended to scripts that must run as on a serving machine: torch, torchvision and clip
# cannot be imported.
BLOCK_TORCH = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "clip"}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: serving code must not import it")
sys.meta_path.insert(0, _Block())
"""
