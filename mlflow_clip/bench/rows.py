"""The in-process rows, each set up in its own child: (a) torch, (b) onnxruntime, and the
pyfunc rows ((c), (e), draft, settings). Each task loads, warms up and returns an
`InProcessRow` whose rounds the parent asks for."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_clip.bench.images import read_pool, request_images
from mlflow_clip.bench.measure import InProcessRow
from mlflow_clip.bench.models import flavor_conf


def task_torch(spec: dict[str, Any]) -> InProcessRow:
    """Row (a): CLIP's preprocess (PIL decode), the PyTorch model and the same baked head."""
    import torch
    from PIL import Image

    from mlflow_clip.export.checkpoints import load_clip
    from mlflow_clip.export.graph import ZeroShotHead

    torch.set_num_threads(spec["threads"])
    loaded = load_clip(spec["clip_spec"])
    head_data = np.load(spec["head"])
    head = ZeroShotHead(
        loaded.model.visual, torch.from_numpy(head_data["text_features"]), float(head_data["logit_scale"])
    )
    head = head.eval()
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        images = [
            loaded.preprocess(Image.open(io.BytesIO(data))) for data in request_images(pool, spec["batch"], index)
        ]
        with torch.inference_mode():
            return head(torch.stack(images)).numpy()

    return InProcessRow(call, spec)


def task_onnxruntime(spec: dict[str, Any]) -> InProcessRow:
    """Row (b): the graph alone on float32 tensors preprocessed beforehand (exactly), with the
    pyfunc's session settings and the model's own runtime (OpenVINO for bf16 and, where chosen,
    static int8)."""
    from mlflow_clip.serving.contract import ClassifierConfig
    from mlflow_clip.serving.images import decode_image
    from mlflow_clip.serving.preprocess import Preprocessor
    from mlflow_clip.serving.runtime import RuntimeSettings, open_session

    model_dir = Path(spec["model_dir"])
    settings = RuntimeSettings.from_dict(flavor_conf(model_dir).get("runtime")).with_overrides(spec["model_config"])
    config = ClassifierConfig.read(model_dir)
    session = open_session(model_dir / "model.onnx", settings, config.precision)
    preprocessor = Preprocessor.from_config(config)
    encoded = read_pool(spec)
    began = time.perf_counter()
    tensors = [preprocessor(decode_image(data)) for data in encoded]
    decode_ms = (time.perf_counter() - began) * 1000.0 / len(encoded)  # the work row (c) adds
    probabilities = session.output_names[:1]  # what the pyfunc asks for
    batches: dict[int, np.ndarray] = {}

    def call(index: int, _state: Any) -> np.ndarray:
        offset = (index * spec["batch"]) % len(tensors)
        if offset not in batches:
            batches[offset] = np.ascontiguousarray(np.stack(request_images(tensors, spec["batch"], index)))
        return session.run(batches[offset], probabilities)[0]

    for index in range(len(tensors)):  # every distinct batch is built before timing
        call(index, None)
    return InProcessRow(call, spec, {"decode_ms": decode_ms})


def task_pyfunc(spec: dict[str, Any]) -> InProcessRow:
    """Rows (c), (e) and draft: the pyfunc end to end from encoded bytes."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(spec["model_dir"], model_config=spec["model_config"])
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        frame = pd.DataFrame({"image": request_images(pool, spec["batch"], index)})
        return np.stack(model.predict(frame, params=spec.get("params"))["probabilities"].to_numpy())

    return InProcessRow(call, spec)
