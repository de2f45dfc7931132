"""mlflow-clip: CLIP zero-shot image classifiers as parity-checked ONNX models in MLflow.

Importing the package is cheap and needs nothing beyond the standard library: the flavor API
(which imports mlflow, onnxruntime and pandas) loads on first use, and the exporter, which
needs torch, lives in `mlflow_clip.export` and is imported only when exporting.

    >>> import mlflow_clip
    >>> classifier = mlflow_clip.load_model("models:/clip-zero-shot@production")  # doctest: +SKIP
    >>> classifier.classes  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from mlflow_clip.serving.contract import FLAVOR_NAME
from mlflow_clip.version import __version__

_FLAVOR_API = ("_load_pyfunc", "get_default_pip_requirements", "load_model", "log_model", "save_model")

__all__ = ["FLAVOR_NAME", "__version__", *_FLAVOR_API[1:]]


def __getattr__(name: str) -> Any:
    if name in _FLAVOR_API:
        return getattr(importlib.import_module("mlflow_clip.flavor"), name)
    raise AttributeError(f"module 'mlflow_clip' has no attribute {name!r}")
