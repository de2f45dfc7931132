"""Registry promotion: gated, auditable, reversible alias moves (`@production`, `@challenger`).

    >>> promote("clip-zero-shot", "3", alias="production")  # doctest: +SKIP
    >>> rollback("clip-zero-shot", alias="production")  # doctest: +SKIP

A promotion checks gates (the version exists; its ONNX file's SHA-256 matches the export's
record; the export's parity metrics are within thresholds; it loads through the flavor and
predicts; optionally its recorded accuracy is no worse than the current holder's), then moves
the alias and records the move on the version and in the registered model's alias history.

Concurrent promotions of one alias are serialized with a bakery lock kept in registered-model
tags (Lamport's bakery algorithm needs only per-writer registers, which tags with distinct keys
are), so the history is a consistent chain and `rollback` can undo moves one by one.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_clip.serving.contract import FLAVOR_NAME, MANIFEST_SHA256_TAG

_logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
TAG_PREFIX = "mlflow_clip."
HISTORY_TAG = TAG_PREFIX + "alias_history.{alias}"
LOCK_TAG = TAG_PREFIX + "lock.{alias}.{owner}"
ACCURACY_TAG = "eval_accuracy"
HISTORY_LIMIT = 200
LOCK_STALE_SECONDS = 600.0
LOCK_POLL_SECONDS = 0.05
# The served reference predictions may differ from the recorded ones by at least this much
# (onnxruntime on another CPU), and otherwise by the export's own parity gate.
REFERENCE_TOLERANCE = 1e-4


class PromotionError(RuntimeError):
    """A gate failed or the request was invalid; the alias did not move."""


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromotionResult:
    model_name: str
    alias: str
    version: str
    previous_version: str | None
    gates: list[GateResult]
    moved: bool
    message: str


@dataclass(frozen=True)
class GateThresholds:
    max_prob_diff: float | None = None  # default: the export run's own max_prob_diff parameter
    max_pixel_diff: float = 0.0
    min_top1_agreement: float | None = None  # default: the export run's own, which follows its precision
    max_accuracy_drop: float | None = None  # None: the accuracy gate is off
    allow_legacy: bool = False  # promote versions saved without a manifest on their graph's checksum alone


def resolve_version(client: MlflowClient, model_name: str, version: str) -> str:
    """A version number, or an alias naming one."""
    try:
        if str(version).isdigit():
            return str(client.get_model_version(model_name, str(version)).version)
        return str(client.get_model_version_by_alias(model_name, str(version)).version)
    except MlflowException as e:
        raise PromotionError(
            f"Gate 'version exists' failed: registered model {model_name!r} has no version or alias "
            f"{version!r} ({e.message.splitlines()[0]})."
        ) from e


def current_holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


# ---------------------------------------------------------------------------------------------
# Gates


def check_gates(
    client: MlflowClient,
    model_name: str,
    version: str,
    thresholds: GateThresholds,
    holder: str | None,
) -> list[GateResult]:
    """Run every gate on `model_name` version `version`; each result carries its figures.

    The version is downloaded afresh; its files are checked against the manifest first, and only
    a version whose files are intact is loaded (its own code then runs, in a separate process).
    """
    mv = client.get_model_version(model_name, version)
    with tempfile.TemporaryDirectory(prefix="mlflow-clip-promote-") as tmp:
        local = _download(mv, tmp)
        checksum = _checksum_gate(mv, local, thresholds)
        parity = _parity_gate(client, mv, thresholds)
        if checksum.passed:
            predict = _predict_gate(local, parity.figures.get("max_prob_diff"))
        else:
            predict = GateResult("loads and predicts", False, "not run: the version's files failed the checksum gate")
        gates = [checksum, parity, predict]
    if thresholds.max_accuracy_drop is not None:
        gates.append(_accuracy_gate(client, model_name, mv, holder, thresholds.max_accuracy_drop))
    return gates


def _download(mv, tmp: str) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp))


def _checksum_gate(mv, local: Path, thresholds: GateThresholds) -> GateResult:
    from mlflow_clip.serving.manifest import (
        Problem,
        describe_problems,
        manifest_digest,
        read_mlmodel,
        recorded_manifest,
        verify_manifest,
    )

    mlmodel = read_mlmodel(local)
    conf = (mlmodel.get("flavors") or {}).get(FLAVOR_NAME)
    if conf is None:
        return GateResult("checksum", False, "the version is not an mlflow_clip model")
    manifest = recorded_manifest(mlmodel)
    if manifest is None:
        return _legacy_checksum_gate(mv, local, conf, thresholds)
    problems = verify_manifest(local, mlmodel, allow_bytecode=False)
    recorded, actual = mv.tags.get(MANIFEST_SHA256_TAG), manifest_digest(manifest)
    figures = {"files": len(manifest["files"]), "manifest_sha256": actual, "recorded": recorded}
    if recorded is None:
        problems_text = describe_problems(problems) if problems else ""
        detail = (
            f"version {mv.version} has no {MANIFEST_SHA256_TAG} tag to pin its manifest (register it with "
            "mlflow-clip export or mlflow_clip.log_model)" + (f"; also {problems_text}" if problems_text else "")
        )
        return GateResult("checksum", False, detail, figures)
    if recorded != actual:
        problems.insert(0, Problem("the manifest in MLmodel", f"differs from the one recorded at export ({recorded[:16]}...)"))
    if problems:
        detail = f"{len(problems)} file(s) differ from the export's manifest: {describe_problems(problems)}"
        return GateResult("checksum", False, detail, {**figures, "problems": [str(p) for p in problems]})
    return GateResult("checksum", True, f"all {len(manifest['files'])} files and MLmodel match the export's manifest", figures)


def _legacy_checksum_gate(mv, local: Path, conf: dict, thresholds: GateThresholds) -> GateResult:
    """Versions saved by mlflow-clip 0.1.0 have no manifest, only the graph's SHA-256."""
    from mlflow_clip.serving.contract import sha256_file

    recorded = mv.tags.get("onnx_sha256") or conf.get("onnx_sha256")
    actual = sha256_file(local / conf.get("onnx_model", "model.onnx"))
    figures = {"recorded": recorded, "actual": actual, "manifest": False}
    if not (actual == recorded == conf.get("onnx_sha256")):
        detail = f"ONNX SHA-256 {actual[:16]}... does not match the export's record {str(recorded)[:16]}... (the artifact was changed after export)"
        return GateResult("checksum", False, detail, figures)
    if not thresholds.allow_legacy:
        detail = (
            f"version {mv.version} was saved by mlflow-clip {conf.get('mlflow_clip_version', '0.1.0')} without a manifest: only "
            "model.onnx can be checked, not its configuration, code or text encoder. Export it again, or pass "
            "--allow-legacy to promote it on that partial check"
        )
        return GateResult("checksum", False, detail, figures)
    return GateResult("checksum", True, "legacy version without a manifest: model.onnx matches the export's record (partial check)", figures)


def _parity_gate(client: MlflowClient, mv, thresholds: GateThresholds) -> GateResult:
    run = client.get_run(mv.run_id)
    metrics, params = run.data.metrics, run.data.params
    max_prob = thresholds.max_prob_diff
    if max_prob is None:
        max_prob = float(params.get("max_prob_diff", 1e-4))
    min_top1 = thresholds.min_top1_agreement
    if min_top1 is None:
        min_top1 = float(params.get("min_top1_agreement", 1.0))
    figures = {
        "parity_max_abs_prob_diff": metrics.get("parity_max_abs_prob_diff"),
        "parity_max_abs_pixel_diff": metrics.get("parity_max_abs_pixel_diff"),
        "parity_top1_agreement": metrics.get("parity_top1_agreement"),
        "max_prob_diff": max_prob,
        "max_pixel_diff": thresholds.max_pixel_diff,
        "min_top1_agreement": min_top1,
    }
    if None in (figures["parity_max_abs_prob_diff"], figures["parity_max_abs_pixel_diff"], figures["parity_top1_agreement"]):
        return GateResult("parity", False, f"the export run {mv.run_id} has no parity metrics", figures)
    failures = []
    if figures["parity_max_abs_prob_diff"] > max_prob:
        failures.append(f"parity_max_abs_prob_diff {figures['parity_max_abs_prob_diff']:.3g} > {max_prob:.3g}")
    if figures["parity_max_abs_pixel_diff"] > thresholds.max_pixel_diff:
        failures.append(f"parity_max_abs_pixel_diff {figures['parity_max_abs_pixel_diff']:.3g} > {thresholds.max_pixel_diff:.3g}")
    if figures["parity_top1_agreement"] < min_top1:
        failures.append(f"parity_top1_agreement {figures['parity_top1_agreement']:.4f} < {min_top1:.4f}")
    detail = "; ".join(failures) or (
        f"parity_max_abs_prob_diff {figures['parity_max_abs_prob_diff']:.2e} <= {max_prob:.0e}, "
        f"pixel diff {figures['parity_max_abs_pixel_diff']:.1g}, top-1 agreement {figures['parity_top1_agreement']:.3f}"
    )
    return GateResult("parity", not failures, detail, figures)


def _predict_gate(local: Path, max_prob_diff: float | None) -> GateResult:
    """Load the version as serving will (its own code and settings, a fresh process without
    torch) and compare its predictions on its reference images with those recorded at export."""
    from mlflow_clip.references import ProbeError, compare_with_reference, max_score_difference, read_reference, run_probe

    reference = read_reference(local)
    if reference is None:
        return _legacy_predict_gate(local)
    tolerance = max(float(max_prob_diff or 0.0), REFERENCE_TOLERANCE)
    try:
        probe = run_probe(local, reference)
    except ProbeError as e:
        return GateResult("loads and predicts", False, f"the version does not load and predict: {e}")
    problems = compare_with_reference(reference, probe, tolerance)
    figures = {"images": len(reference["images"]), "max_score_diff": max_score_difference(reference, probe), "tolerance": tolerance,
               "per_request": "per_request" in reference}
    if problems:
        return GateResult("loads and predicts", False, "; ".join(problems[:5]), figures)
    kinds = "baked classes and per-request labels" if "per_request" in reference else "baked classes"
    return GateResult(
        "loads and predicts", True,
        f"served in a fresh process, {len(reference['images'])} reference images ({kinds}) match the export's predictions "
        f"(max score diff {figures['max_score_diff']:.1e} <= {tolerance:.0e})", figures,
    )


def _legacy_predict_gate(local: Path) -> GateResult:
    import numpy as np

    from mlflow_clip.package_data import sample_image_paths
    from mlflow_clip.serving.loader import load_classifier

    try:
        classifier = load_classifier(str(local))
        out = classifier.predict([p.read_bytes() for p in sample_image_paths()])
    except Exception as e:  # any failure to load or predict refuses the promotion
        return GateResult("loads and predicts", False, f"{type(e).__name__}: {e}")
    sums = np.array([sum(p) for p in out["probabilities"]])
    ok = bool(out["label"].notna().all() and np.allclose(sums, 1.0, atol=1e-3))
    detail = f"predicted {len(out)} sample images" + ("" if ok else " but some rows were not valid probabilities")
    return GateResult("loads and predicts", ok, detail, {"images": len(out), "max_sum_error": float(np.abs(sums - 1).max())})


def _accuracy_gate(client, model_name, mv, holder, max_drop) -> GateResult:
    candidate = mv.tags.get(ACCURACY_TAG)
    if holder is None or candidate is None:
        return GateResult("accuracy", True, "skipped: no recorded accuracy to compare", {"candidate": candidate})
    incumbent = client.get_model_version(model_name, holder).tags.get(ACCURACY_TAG)
    if incumbent is None:
        return GateResult("accuracy", True, f"skipped: version {holder} has no recorded accuracy", {"candidate": candidate})
    drop = float(incumbent) - float(candidate)
    figures = {"candidate": float(candidate), "current": float(incumbent), "drop": drop, "max_accuracy_drop": max_drop}
    passed = drop <= max_drop
    detail = f"accuracy {float(candidate):.4f} vs current {float(incumbent):.4f} (drop {drop:.4f}, allowed {max_drop:.4f})"
    return GateResult("accuracy", passed, detail, figures)


# ---------------------------------------------------------------------------------------------
# The bakery lock (one per registered model and alias)


class AliasLock:
    """Lamport's bakery lock over registered-model tags: each contender writes only its own tag."""

    def __init__(self, client: MlflowClient, model_name: str, alias: str, timeout: float = 300.0):
        self.client, self.model_name, self.alias, self.timeout = client, model_name, alias, timeout
        self.owner = uuid.uuid4().hex
        self.key = LOCK_TAG.format(alias=alias, owner=self.owner)
        self.prefix = LOCK_TAG.format(alias=alias, owner="")

    def _write(self, choosing: bool, number: int) -> None:
        value = json.dumps({"choosing": choosing, "number": number, "at": time.time()})
        self.client.set_registered_model_tag(self.model_name, self.key, value)

    def _others(self) -> dict[str, dict]:
        tags = self.client.get_registered_model(self.model_name).tags
        others = {}
        for key, value in tags.items():
            if key.startswith(self.prefix) and key != self.key:
                entry = json.loads(value)
                if time.time() - entry.get("at", 0) > LOCK_STALE_SECONDS:
                    continue  # a contender that died holding a ticket
                others[key[len(self.prefix):]] = entry
        return others

    def __enter__(self) -> "AliasLock":
        self._write(True, 0)
        number = 1 + max([e["number"] for e in self._others().values()] + [0])
        self._write(False, number)
        deadline = time.monotonic() + self.timeout
        while True:
            blocking = [
                owner for owner, e in self._others().items()
                if e["choosing"] or (e["number"] and (e["number"], owner) < (number, self.owner))
            ]
            if not blocking:
                return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise PromotionError(f"Timed out after {self.timeout:.0f} s waiting for other promotions of @{self.alias}.")
            time.sleep(LOCK_POLL_SECONDS)

    def __exit__(self, *exc) -> None:
        try:
            self.client.delete_registered_model_tag(self.model_name, self.key)
        except MlflowException:
            _logger.warning("Could not release the promotion lock tag %s", self.key)


# ---------------------------------------------------------------------------------------------
# History


def read_history(client: MlflowClient, model_name: str, alias: str) -> list[dict]:
    """The alias's moves, oldest first: {action, version, previous, at, by}."""
    raw = client.get_registered_model(model_name).tags.get(HISTORY_TAG.format(alias=alias))
    return json.loads(raw) if raw else []


def _write_history(client: MlflowClient, model_name: str, alias: str, history: list[dict]) -> None:
    client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias), json.dumps(history[-HISTORY_LIMIT:]))


def promotion_stack(history: list[dict]) -> list[dict]:
    """Replay the history: promotions push, rollbacks pop. The top is the move in effect."""
    stack: list[dict] = []
    for event in history:
        if event["action"] == "promote":
            stack.append(event)
        elif event["action"] == "rollback" and stack:
            stack.pop()
    return stack


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _who() -> str:
    return os.environ.get("MLFLOW_CLIP_PROMOTED_BY") or getpass.getuser()


# ---------------------------------------------------------------------------------------------
# Public API


def promote(
    model_name: str,
    version: str,
    alias: str = DEFAULT_ALIAS,
    thresholds: GateThresholds = GateThresholds(),
    copy_to: str | None = None,
    client: MlflowClient | None = None,
) -> PromotionResult:
    """Gate `model_name` version `version` (a number or an alias) and point `alias` at it.

    With `copy_to`, the version is first copied into that registered model (e.g. from
    `clip-zero-shot-staging` to `clip-zero-shot`) and the alias is set there.
    Raises PromotionError naming the failed gate and its figures; the alias then stays put.
    """
    client = client or MlflowClient()
    source_version = resolve_version(client, model_name, version)
    target_name = copy_to or model_name
    holder = current_holder(client, target_name, alias)
    gates = check_gates(client, model_name, source_version, thresholds, holder)
    failed = [g for g in gates if not g.passed]
    if failed:
        raise PromotionError(
            "Promotion refused, @%s stays on %s: " % (alias, holder or "no version")
            + "; ".join(f"gate '{g.name}' failed: {g.detail}" for g in failed)
        )
    target_version = _copy(client, model_name, source_version, copy_to) if copy_to else source_version
    with AliasLock(client, target_name, alias):
        return _move_alias(client, target_name, alias, target_version, gates, copied_from=(model_name, source_version) if copy_to else None)


def _copy(client: MlflowClient, model_name: str, version: str, destination: str) -> str:
    copied = client.copy_model_version(f"models:/{model_name}/{version}", destination)
    source = client.get_model_version(model_name, version)
    for key, value in source.tags.items():
        client.set_model_version_tag(destination, copied.version, key, value)
    client.set_model_version_tag(destination, copied.version, "copied_from", f"{model_name}/{version}")
    return str(copied.version)


def _move_alias(client, model_name, alias, version, gates, copied_from=None) -> PromotionResult:
    holder = current_holder(client, model_name, alias)
    if holder == version:
        message = f"{model_name} version {version} already holds @{alias}; nothing to do."
        return PromotionResult(model_name, alias, version, holder, gates, False, message)
    at, by = _now(), _who()
    client.set_registered_model_alias(model_name, alias, version)
    history = read_history(client, model_name, alias)
    history.append({"action": "promote", "version": version, "previous": holder, "at": at, "by": by})
    _write_history(client, model_name, alias, history)
    tags = {
        "promoted_by": by,
        "promoted_at": at,
        "promoted_alias": alias,
        "promoted_previous_version": holder or "",
        "promotion_gates": json.dumps([asdict(g) for g in gates], default=str)[:4900],
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    message = f"{model_name} @{alias}: version {holder or 'none'} -> {version}"
    return PromotionResult(model_name, alias, version, holder, gates, True, message)


def rollback(model_name: str, alias: str = DEFAULT_ALIAS, client: MlflowClient | None = None) -> PromotionResult:
    """Move `alias` back to the version that held it before the last promotion in effect."""
    client = client or MlflowClient()
    with AliasLock(client, model_name, alias):
        history = read_history(client, model_name, alias)
        stack = promotion_stack(history)
        holder = current_holder(client, model_name, alias)
        if not stack:
            raise PromotionError(f"No promotion of {model_name} @{alias} to roll back (its history is empty).")
        top = stack[-1]
        if top["version"] != holder:
            raise PromotionError(
                f"@{alias} is on version {holder}, but the last recorded promotion set it to {top['version']}; "
                "it was moved outside mlflow-clip. Promote the version you want explicitly."
            )
        previous = top["previous"]
        if previous:
            client.set_registered_model_alias(model_name, alias, previous)
        else:
            client.delete_registered_model_alias(model_name, alias)
        history.append({"action": "rollback", "version": previous, "previous": holder, "at": _now(), "by": _who()})
        _write_history(client, model_name, alias, history)
    message = f"{model_name} @{alias}: version {holder} -> {previous or 'none (alias removed)'}"
    return PromotionResult(model_name, alias, previous or "", holder, [], True, message)
