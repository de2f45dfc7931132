"""Small MLflow tracking helpers shared by the export and evaluation jobs.

>>> with active_or_new_run() as run:  # doctest: +SKIP
...     log_new_params(run.info.run_id, {"model": "demo"})
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


@contextmanager
def active_or_new_run(experiment_name: str | None = None, run_name: str | None = None) -> Iterator[Any]:
    """The active run (e.g. the one `mlflow run` started), or a new one (in `experiment_name`
    when given) that ends FAILED if the block raises."""
    import os

    import mlflow

    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` started it: resume it as it is
        with mlflow.start_run() as run:
            yield run
        return
    if experiment_name:
        mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=run_name) as run:
        yield run


def log_new_params(run_id: str, params: dict[str, Any]) -> None:
    """Log the params the run does not have yet. `mlflow run` has already logged the entry
    point's parameters (as given, shell-quoted: '' for an empty one), and MLflow refuses to
    change a logged param."""
    import mlflow

    logged = mlflow.MlflowClient().get_run(run_id).data.params
    new = {key: str(value)[:MAX_PARAM_CHARS] for key, value in params.items() if key not in logged}
    mlflow.log_params(new, run_id=run_id)
