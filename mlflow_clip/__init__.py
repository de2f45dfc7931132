"""mlflow-clip: CLIP zero-shot image classifiers as parity-checked ONNX models in MLflow.

This package's top level is the serving world (onnxruntime, numpy, Pillow): it never imports
torch. The exporter lives in `mlflow_clip.export` and is imported only when exporting.

    >>> import mlflow_clip
    >>> classifier = mlflow_clip.load_model("models:/clip-zero-shot@production")  # doctest: +SKIP
    >>> classifier.classes  # doctest: +SKIP
"""

from mlflow_clip.flavor import (
    FLAVOR_NAME,
    _load_pyfunc,
    get_default_pip_requirements,
    load_model,
    log_model,
    save_model,
)
from mlflow_clip.version import __version__

__all__ = [
    "FLAVOR_NAME",
    "__version__",
    "get_default_pip_requirements",
    "load_model",
    "log_model",
    "save_model",
]
