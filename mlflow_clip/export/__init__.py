"""The export world: torch, clip, onnxsim and sclblonnx. Serving never imports this package.

>>> from mlflow_clip.export import export_and_register  # doctest: +SKIP
>>> export_and_register(classes="a red circle,a blue square", model="demo")  # doctest: +SKIP

`mlflow_clip.export.spec` (the checked arguments) imports no torch, so that a bad argument is
reported before torch loads; the job's names below are imported on first use for the same reason.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_classifier", "export_and_register"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mlflow_clip.export import job

        return getattr(job, name)
    raise AttributeError(f"module 'mlflow_clip.export' has no attribute {name!r}")
