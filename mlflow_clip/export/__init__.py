"""The export world: torch, clip, onnxsim and sclblonnx. Serving never imports this package.

>>> from mlflow_clip.export import export_and_register  # doctest: +SKIP
>>> export_and_register(classes="a red circle,a blue square", model="demo")  # doctest: +SKIP
"""

from mlflow_clip.export.job import build_classifier, export_and_register

__all__ = ["build_classifier", "export_and_register"]
