"""Each promotion or rollback through the CLI or the MLproject entry points is an MLflow run too,
so the MLflow UI shows who moved which alias, when, and with which gate figures.

Params: the model, the alias, the version asked for and the one resolved, the previous holder,
the outcome and the history record's sequence number. Metrics: each gate's pass (1) or fail
(0), its time (`gate_<name>_seconds`) and its numeric figures, and each phase's time
(`promotion_<phase>_seconds`: gates, lock, move, total). The run's description links the
version; the version's `promotion_run_id` tag links back.

Names are checked, and the version looked up, before the run is opened: a request refused
there leaves no run behind. Run names fit MLflow's column (250 characters) whatever the names.

    >>> with active_or_new_run() as run:  # doctest: +SKIP
    ...     result = promote("clip-zero-shot", "3", run_id=run.info.run_id)
    ...     log_promotion(run.info.run_id, "promote", "3", result)
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import quote

from mlflow_clip.registry.gates import GateResult
from mlflow_clip.registry.names import MAX_RUN_NAME_LENGTH, check_names, fit
from mlflow_clip.registry.promotion import PromotionResult

_METRIC_NAME = re.compile(r"[^\w\-./ ]")
MAX_DESCRIPTION_CHARS = 8000  # MLflow's limit on a run tag's value (the run's description)


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
        metrics = gate_metrics(result.gates)
        metrics.update({f"promotion_{phase}_seconds": value for phase, value in result.seconds.items()})
        mlflow.log_metrics(metrics, run_id=run_id)
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
    """`gate_<name>_passed`, `gate_<name>_seconds` and `gate_<name>_<figure>` for each numeric figure."""
    metrics = {}
    for gate in gates:
        prefix = "gate_" + _METRIC_NAME.sub("_", gate.name).replace(" ", "_")
        metrics[f"{prefix}_passed"] = 1.0 if gate.passed else 0.0
        if gate.seconds is not None:
            metrics[f"{prefix}_seconds"] = float(gate.seconds)
        for key, value in gate.figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"{prefix}_{_METRIC_NAME.sub('_', str(key))}"] = float(value)
    return metrics


def _description(action: str, result: PromotionResult | None, error: str) -> str:
    if result is None:
        return f"**{action}** refused: {error}"[:MAX_DESCRIPTION_CHARS]
    link = (
        f"[{result.model_name} version {result.version}]"
        f"(#/models/{quote(result.model_name, safe='')}/versions/{result.version})"
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
    text = "\n".join(lines)
    return text if len(text) <= MAX_DESCRIPTION_CHARS else text[: MAX_DESCRIPTION_CHARS - 3] + "..."


def run_name(action: str, model_name: str, alias: str) -> str:
    """`promote <model> @<alias>`, shortened with a digest to fit MLflow's run-name column."""
    return fit(f"{action} {model_name} @{alias}", MAX_RUN_NAME_LENGTH)


def promote_in_run(
    model_name: str,
    version: str,
    alias: str,
    thresholds,
    copy_to: str | None = None,
    experiment_name: str | None = None,
    probe=None,
) -> PromotionResult:
    """`promote`, recorded as an MLflow run (the active one, e.g. `mlflow run`'s, or a new one).
    The names and the version are checked first: a request refused there opens no run. Then
    the gates' fresh serving process starts (unless `probe`, a `ServingProbe` started earlier,
    is given), so that it imports while the run opens and the version downloads."""
    from contextlib import ExitStack

    from mlflow.tracking import MlflowClient

    from mlflow_clip.references import ServingProbe
    from mlflow_clip.registry.gates import needs_probe
    from mlflow_clip.registry.promotion import check_promotion

    check_names(model_name, alias, copy_to, experiment_name)
    client = MlflowClient()
    source = check_promotion(client, model_name, version, alias, copy_to).figures["version"]
    with ExitStack() as stack:
        if probe is None and needs_probe(client, model_name, source):
            probe = stack.enter_context(ServingProbe())
        return _promote_in_run(model_name, version, alias, thresholds, copy_to, experiment_name, client, probe)


def _promote_in_run(model_name, version, alias, thresholds, copy_to, experiment_name, client, probe) -> PromotionResult:
    from mlflow_clip.registry.promotion import PromotionError, promote
    from mlflow_clip.tracking import active_or_new_run

    with active_or_new_run(experiment_name, run_name=run_name("promote", model_name, alias)) as run:
        try:
            result = promote(model_name, version, alias, thresholds, copy_to, client, run.info.run_id, probe=probe)
        except PromotionError as e:
            log_promotion(run.info.run_id, "promote", version, e.result, str(e))
            raise
        log_promotion(run.info.run_id, "promote", version, result)
        return result


def rollback_in_run(model_name: str, alias: str, experiment_name: str | None = None) -> PromotionResult:
    """`rollback`, recorded as an MLflow run (after the names and the model are checked)."""
    from mlflow.tracking import MlflowClient

    from mlflow_clip.registry.promotion import PromotionError, registered_model, rollback
    from mlflow_clip.tracking import active_or_new_run

    check_names(model_name, alias, experiment_name=experiment_name)
    client = MlflowClient()
    registered_model(client, model_name)
    with active_or_new_run(experiment_name, run_name=run_name("rollback", model_name, alias)) as run:
        try:
            result = rollback(model_name, alias, client=client, run_id=run.info.run_id)
        except PromotionError as e:
            log_promotion(run.info.run_id, "rollback", alias, None, str(e))
            raise
        log_promotion(run.info.run_id, "rollback", alias, result)
        return result
