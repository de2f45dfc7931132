"""Each promotion or rollback through the CLI or the MLproject entry points is an MLflow run too,
so the MLflow UI shows who moved which alias, when, and with which gate figures.

Params: the model, the alias, the version asked for and the one resolved, the previous holder,
the outcome and the history record's sequence number. Metrics: each gate's pass (1) or fail
(0) and its numeric figures. The run's description links the version; the version's
`promotion_run_id` tag links back.

    >>> with active_or_new_run() as run:  # doctest: +SKIP
    ...     result = promote("clip-zero-shot", "3", run_id=run.info.run_id)
    ...     log_promotion(run.info.run_id, "promote", "3", result)
"""

from __future__ import annotations

import math
import re
from typing import Any

from mlflow_clip.registry.gates import GateResult
from mlflow_clip.registry.promotion import PromotionResult

_METRIC_NAME = re.compile(r"[^\w\-./ ]")


def log_promotion(run_id: str, action: str, asked: str, result: PromotionResult | None, error: str = "") -> None:
    """Record one promotion, rollback or refusal on the MLflow run `run_id`."""
    import mlflow

    from mlflow_clip.tracking import log_new_params

    params: dict[str, Any] = {"action": action, "version_asked": asked}
    if result is not None:
        params.update(
            {
                "model_name": result.model_name,
                "alias": result.alias,
                "version": result.version,
                # under `mlflow run -e promote`, "version" already holds what was typed (an alias,
                # say): the number the alias now names is kept under a key of its own
                "resolved_version": result.version,
                "previous_version": result.previous_version or "",
                "outcome": _outcome(action, result, error),
                "history_seq": result.seq if result.seq is not None else "",
            }
        )
        mlflow.log_metrics(gate_metrics(result.gates), run_id=run_id)
    else:
        params["outcome"] = "refused"
    log_new_params(run_id, params)
    mlflow.MlflowClient().set_tag(run_id, "mlflow.note.content", _description(action, result, error))


def _outcome(action: str, result: PromotionResult, error: str) -> str:
    if error:
        return "refused"
    if not result.moved:
        return "nothing to do"
    return "rolled back" if action == "rollback" else "promoted"


def gate_metrics(gates: list[GateResult]) -> dict[str, float]:
    """`gate_<name>_passed` and `gate_<name>_<figure>` for each numeric figure."""
    metrics = {}
    for gate in gates:
        prefix = "gate_" + _METRIC_NAME.sub("_", gate.name).replace(" ", "_")
        metrics[f"{prefix}_passed"] = 1.0 if gate.passed else 0.0
        for key, value in gate.figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"{prefix}_{_METRIC_NAME.sub('_', str(key))}"] = float(value)
    return metrics


def _description(action: str, result: PromotionResult | None, error: str) -> str:
    if result is None:
        return f"**{action}** refused: {error}"
    link = (
        f"[{result.model_name} version {result.version}](#/models/{result.model_name}/versions/{result.version})"
        if result.version
        else f"{result.model_name}: no version"
    )
    lines = [
        f"**{action}** of @{result.alias} to {link} (from version {result.previous_version or 'none'}): "
        f"{_outcome(action, result, error)}."
    ]
    if error:
        lines.append(f"\n{error}")
    if result.gates:
        lines += ["", "| gate | result | detail |", "|---|---|---|"]
        lines += [
            f"| {g.name} | {'passed' if g.passed else 'FAILED'} | {g.detail.replace('|', '/')} |" for g in result.gates
        ]
    return "\n".join(lines)


def promote_in_run(
    model_name: str,
    version: str,
    alias: str,
    thresholds,
    copy_to: str | None = None,
    experiment_name: str | None = None,
) -> PromotionResult:
    """`promote`, recorded as an MLflow run (the active one, e.g. `mlflow run`'s, or a new one)."""
    from mlflow_clip.registry.promotion import PromotionError, promote
    from mlflow_clip.tracking import active_or_new_run

    with active_or_new_run(experiment_name, run_name=f"promote {model_name} @{alias}") as run:
        try:
            result = promote(model_name, version, alias, thresholds, copy_to=copy_to, run_id=run.info.run_id)
        except PromotionError as e:
            log_promotion(run.info.run_id, "promote", version, e.result, str(e))
            raise
        log_promotion(run.info.run_id, "promote", version, result)
        return result


def rollback_in_run(model_name: str, alias: str, experiment_name: str | None = None) -> PromotionResult:
    """`rollback`, recorded as an MLflow run."""
    from mlflow_clip.registry.promotion import PromotionError, rollback
    from mlflow_clip.tracking import active_or_new_run

    with active_or_new_run(experiment_name, run_name=f"rollback {model_name} @{alias}") as run:
        try:
            result = rollback(model_name, alias, run_id=run.info.run_id)
        except PromotionError as e:
            log_promotion(run.info.run_id, "rollback", alias, None, str(e))
            raise
        log_promotion(run.info.run_id, "rollback", alias, result)
        return result
