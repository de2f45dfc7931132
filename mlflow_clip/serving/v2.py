"""The table `mlserver_mlflow.MLflowRuntime` can encode: MLServer's MLflow runtime, served as before.

MLServer serves mlflow-clip models best through the project's own runtime,
`mlflow_clip.mlserver.ClipRuntime`, which reads the unchanged table and answers typed tensors.
Models set up with MLServer's MLflow runtime (`mlserver_mlflow.MLflowRuntime`) keep working as
they did: that runtime calls the pyfunc's `predict` and encodes what it returns with its pandas
codec, which cannot encode a null in a text or list column (it calls `numpy.isnan` on every cell
of a column that has one), nor a bare Series, and it gives the model no way to know it is the
caller. So the pyfunc recognizes that one caller by its frame on the stack (`called_by_mlserver`)
and, for it alone, returns the table in a form V2 tensors can carry; every other caller
(`mlflow models serve`, MLServer's own `/invocations`, Spark, in-process `predict`, ClipRuntime)
gets the table unchanged, real nulls included:

- `output="label"` gives a one-column table `label` instead of a Series;
- a null text (`label`, `error`) becomes "" and a null list (`probabilities`, `top_labels`,
  `top_scores`, `embedding`) becomes []: V2 tensors have no null text;
- `score` is a float column whose missing values V2 sends as null;
- errors become MLServer's own, with the HTTP status MLflow would give (400 for bad input).

    >>> v2_table(pd.Series(["a red circle"], name="label"))  # doctest: +SKIP
              label
    0  a red circle
"""

from __future__ import annotations

import inspect
from typing import Any

import pandas as pd

# The module whose `predict` serves V2 requests, and how far up the stack its frame may be
# (MLflow's pyfunc wrapper and this package's own calls lie between).
MLSERVER_RUNTIME_MODULE = "mlserver_mlflow.runtime"
MLSERVER_PREDICT = "predict"
MAX_CALLER_DEPTH = 40
# What stands for a null in each output column of a V2 response (`score` keeps real nulls).
V2_FILL: dict[str, Any] = {
    "label": "",
    "error": "",
    "probabilities": [],
    "top_labels": [],
    "top_scores": [],
    "embedding": [],
}
NUMBER_COLUMNS = ("score",)


def called_by_mlserver() -> bool:
    """True when the running call comes from MLServer's V2 `predict` (not its `/invocations`)."""
    frame = inspect.currentframe()
    for _ in range(MAX_CALLER_DEPTH):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return False
        if frame.f_code.co_name == MLSERVER_PREDICT and frame.f_globals.get("__name__") == MLSERVER_RUNTIME_MODULE:
            return True
    return False


def v2_table(output: pd.DataFrame | pd.Series) -> pd.DataFrame:
    """The pyfunc's output in a form MLServer's pandas codec encodes: see the module docstring."""
    table = output.to_frame() if isinstance(output, pd.Series) else output.copy()
    for name in table.columns:
        column = table[name]
        if name in NUMBER_COLUMNS:
            table[name] = pd.to_numeric(column, errors="coerce").astype(float)
        elif name in V2_FILL and column.isna().any():
            fill = type(V2_FILL[name])  # a new "" or [] for each missing cell
            table[name] = pd.Series([fill() if _missing(v) else v for v in column], index=table.index, dtype=object)
    return table


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def mlserver_error(error: Exception) -> Exception:
    """MLServer's error for `error` (an MlflowException): the same message, and the HTTP status
    MLflow's scoring server would answer with, where MLServer would answer any other error with
    a 500 and its stack trace."""
    # Only ever called under MLServer's runtime, so its package is importable here.
    from mlserver.errors import MLServerError

    status = error.get_http_status_code() if hasattr(error, "get_http_status_code") else 500
    return MLServerError(getattr(error, "message", str(error)), status_code=status)
