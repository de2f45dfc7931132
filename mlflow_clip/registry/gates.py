"""The promotion gates: each checks one thing about a registered version and reports its figures.

    >>> gates = check_gates(client, "clip-zero-shot", "3", GateThresholds(), holder="2")  # doctest: +SKIP
    >>> [(g.name, g.passed) for g in gates]  # doctest: +SKIP
    [('checksum', True), ('parity', True), ('loads and predicts', True)]

checksum: every file of a fresh download against the version's manifest, and the manifest
against the `manifest_sha256` tag set at registration. parity: the export run's parity
metrics within thresholds. loads and predicts: only when the files are intact, the version
loaded as serving loads it (its own code, a fresh process without torch) must give the
predictions recorded at export on its reference images. accuracy (optional): the candidate's
recorded accuracy against the current holder's.

Each gate's `seconds` is what it added to the promotion. The version is downloaded once, and
every gate reads that copy. The fresh serving process starts ahead (`promote_in_run` starts it
once the version is known to exist, `check_gates` at the latest with the download): its
interpreter and imports, most of its cost, load while the run opens and the files are checked,
and it is given the model only once they passed (`ServingProbe`).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from mlflow_clip.serving.contract import FLAVOR_NAME, MANIFEST_SHA256_TAG

if TYPE_CHECKING:
    from mlflow_clip.references import ServingProbe

ACCURACY_TAG = "eval_accuracy"
# The served reference predictions may differ from the recorded ones by at least this much
# (onnxruntime on another CPU), and otherwise by the export's own parity gate.
REFERENCE_TOLERANCE = 1e-4


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None  # what the gate added to the promotion's time


@dataclass(frozen=True)
class GateThresholds:
    max_prob_diff: float | None = None  # default: the export run's own max_prob_diff parameter
    max_pixel_diff: float = 0.0
    min_top1_agreement: float | None = None  # default: the export run's own, which follows its precision
    max_accuracy_drop: float | None = None  # None: the accuracy gate is off
    allow_legacy: bool = False  # promote versions saved without a manifest on their graph's checksum alone
    allow_missing_accuracy: bool = False  # let the accuracy gate pass when a version has no evaluation


def version_exists_gate(model_name: str, version: str, reference: str) -> GateResult:
    return GateResult("version exists", True, f"{reference} is version {version} of {model_name}", {"version": version})


def check_gates(
    client: MlflowClient, model_name: str, version: str, thresholds: GateThresholds, probe: ServingProbe | None = None
) -> list[GateResult]:
    """The gates on the version itself (checksum, parity, loads and predicts), each with its
    figures and its time. `probe`: a serving process started ahead (its caller closes it);
    without one, one is started here.

    The version is downloaded afresh; its files are checked against the manifest first, and only
    a version whose files are intact is loaded (its own code then runs, in a separate process).
    The accuracy gate compares with the current holder, so it runs under the alias's lock
    (`accuracy_gate`).
    """
    from mlflow_clip.references import ServingProbe

    mv = client.get_model_version(model_name, version)
    own = probe is None and not _probed(mv.tags.get(MANIFEST_SHA256_TAG))
    probe = ServingProbe() if own else probe
    try:
        with tempfile.TemporaryDirectory(prefix="mlflow-clip-promote-") as tmp:
            started = time.monotonic()
            local = _download(mv, tmp)
            downloaded = time.monotonic()
            checksum = _checksum_gate(mv, local, thresholds)
            checksum.figures["download_seconds"] = downloaded - started
            checksum.seconds = time.monotonic() - started
            parity = _timed(_parity_gate, client, mv, thresholds)
            if checksum.passed:
                digest = checksum.figures.get("manifest_sha256")
                predict = _timed(_predict_gate, local, parity.figures.get("max_prob_diff"), digest, probe)
            else:
                predict = GateResult(
                    "loads and predicts", False, "not run: the version's files failed the checksum gate", seconds=0.0
                )
            return [checksum, parity, predict]
    finally:
        if own:
            probe.close()


def _timed(gate, *args) -> GateResult:
    started = time.monotonic()
    result = gate(*args)
    result.seconds = time.monotonic() - started
    return result


def _download(mv, tmp: str) -> Path:
    from mlflow.artifacts import download_artifacts
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    with _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false"):  # the gates report what matters
        return Path(download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp))


@contextmanager
def _environment(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


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
        problems.insert(
            0, Problem("the manifest in MLmodel", f"differs from the one recorded at export ({recorded[:16]}...)")
        )
    if problems:
        detail = f"{len(problems)} file(s) differ from the export's manifest: {describe_problems(problems)}"
        return GateResult("checksum", False, detail, {**figures, "problems": [str(p) for p in problems]})
    return GateResult(
        "checksum", True, f"all {len(manifest['files'])} files and MLmodel match the export's manifest", figures
    )


def _legacy_checksum_gate(mv, local: Path, conf: dict, thresholds: GateThresholds) -> GateResult:
    """Versions saved by mlflow-clip 0.1.0 have no manifest, only the graph's SHA-256."""
    from mlflow_clip.serving.contract import sha256_file

    recorded = mv.tags.get("onnx_sha256") or conf.get("onnx_sha256")
    actual = sha256_file(local / conf.get("onnx_model", "model.onnx"))
    figures = {"recorded": recorded, "actual": actual, "manifest": False}
    if not (actual == recorded == conf.get("onnx_sha256")):
        detail = (
            f"ONNX SHA-256 {actual[:16]}... does not match the export's record {str(recorded)[:16]}... "
            "(the artifact was changed after export)"
        )
        return GateResult("checksum", False, detail, figures)
    if not thresholds.allow_legacy:
        detail = (
            f"version {mv.version} was saved by mlflow-clip {conf.get('mlflow_clip_version', '0.1.0')} without "
            "a manifest: only "
            "model.onnx can be checked, not its configuration, code or text encoder. Export it again, or pass "
            "--allow-legacy to promote it on that partial check"
        )
        return GateResult("checksum", False, detail, figures)
    return GateResult(
        "checksum",
        True,
        "legacy version without a manifest: model.onnx matches the export's record (partial check)",
        figures,
    )


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
    if None in (
        figures["parity_max_abs_prob_diff"],
        figures["parity_max_abs_pixel_diff"],
        figures["parity_top1_agreement"],
    ):
        return GateResult("parity", False, f"the export run {mv.run_id} has no parity metrics", figures)
    failures = []
    if figures["parity_max_abs_prob_diff"] > max_prob:
        failures.append(f"parity_max_abs_prob_diff {figures['parity_max_abs_prob_diff']:.3g} > {max_prob:.3g}")
    if figures["parity_max_abs_pixel_diff"] > thresholds.max_pixel_diff:
        failures.append(
            f"parity_max_abs_pixel_diff {figures['parity_max_abs_pixel_diff']:.3g} > {thresholds.max_pixel_diff:.3g}"
        )
    if figures["parity_top1_agreement"] < min_top1:
        failures.append(f"parity_top1_agreement {figures['parity_top1_agreement']:.4f} < {min_top1:.4f}")
    detail = "; ".join(failures) or (
        f"parity_max_abs_prob_diff {figures['parity_max_abs_prob_diff']:.2e} <= {max_prob:.0e}, "
        f"pixel diff {figures['parity_max_abs_pixel_diff']:.1g}, top-1 agreement {figures['parity_top1_agreement']:.3f}"
    )
    return GateResult("parity", not failures, detail, figures)


# Probe results of byte-identical models (the same manifest, just verified by the checksum gate)
# in this process: the probe is deterministic, so promoting one version to several aliases, or
# back and forth, loads it in a fresh process once.
_PROBES: dict[tuple[str, float], dict] = {}


def needs_probe(client: MlflowClient, model_name: str, version: str) -> bool:
    """Whether 'loads and predicts' would start a serving process for this version (it has not
    been served in this process yet), so a caller can start one ahead."""
    return not _probed(client.get_model_version(model_name, version).tags.get(MANIFEST_SHA256_TAG))


def _probed(manifest_sha256: str | None) -> bool:
    return manifest_sha256 is not None and any(key[0] == manifest_sha256 for key in _PROBES)


def _predict_gate(
    local: Path, max_prob_diff: float | None, manifest_sha256: str | None = None, probe: ServingProbe | None = None
) -> GateResult:
    """Load the version as serving will (its own code and settings, a fresh process without
    torch, `probe` when one was started ahead) and compare its predictions on its reference
    images with those recorded at export."""
    from mlflow_clip.references import (
        ProbeError,
        compare_with_reference,
        max_score_difference,
        read_reference,
        run_probe,
    )

    reference = read_reference(local)
    if reference is None:
        return _legacy_predict_gate(local)
    tolerance = max(float(max_prob_diff or 0.0), REFERENCE_TOLERANCE)
    key = (manifest_sha256 or "", tolerance)
    cached = manifest_sha256 is not None and key in _PROBES
    try:
        served = _PROBES[key] if cached else probe.run(local, reference) if probe else run_probe(local, reference)
    except ProbeError as e:
        return GateResult("loads and predicts", False, f"the version does not load and predict: {e}")
    if manifest_sha256 is not None:
        _PROBES[key] = served
    problems = compare_with_reference(reference, served, tolerance)
    figures = {
        "images": len(reference["images"]),
        "max_score_diff": max_score_difference(reference, served),
        "tolerance": tolerance,
        "per_request": "per_request" in reference,
        "fresh_process": not cached,
    }
    if not cached:
        figures.update({f"{k}_seconds": v for k, v in (served.get("seconds") or {}).items() if v is not None})
    if problems:
        return GateResult("loads and predicts", False, "; ".join(problems[:5]), figures)
    kinds = "baked classes and per-request labels" if "per_request" in reference else "baked classes"
    where = "as served earlier in this process (the same manifest)" if cached else "served in a fresh process"
    return GateResult(
        "loads and predicts",
        True,
        f"{where}, {len(reference['images'])} reference images ({kinds}) match the export's predictions "
        f"(max score diff {figures['max_score_diff']:.1e} <= {tolerance:.0e})",
        figures,
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
    return GateResult(
        "loads and predicts", ok, detail, {"images": len(out), "max_sum_error": float(np.abs(sums - 1).max())}
    )


def accuracy_gate(
    client, model_name: str, candidate: str, holder: str | None, thresholds: GateThresholds
) -> GateResult:
    """The candidate's recorded accuracy against the holder's (read under the lock)."""
    max_drop = thresholds.max_accuracy_drop
    if holder is None:
        return GateResult(
            "accuracy", True, "no version holds the alias yet: nothing to compare with", {"max_accuracy_drop": max_drop}
        )
    accuracy = {v: client.get_model_version(model_name, v).tags.get(ACCURACY_TAG) for v in (candidate, holder)}
    missing = [v for v in (candidate, holder) if accuracy[v] is None]
    if missing:
        return _missing_accuracy(model_name, missing, thresholds)
    drop = float(accuracy[holder]) - float(accuracy[candidate])
    figures = {
        "candidate": float(accuracy[candidate]),
        "current": float(accuracy[holder]),
        "drop": drop,
        "max_accuracy_drop": max_drop,
    }
    detail = (
        f"accuracy {figures['candidate']:.4f} (version {candidate}) vs {figures['current']:.4f} (version {holder}, "
        f"holding the alias): drop {drop:.4f}, allowed {max_drop:.4f}"
    )
    return GateResult("accuracy", drop <= max_drop, detail, figures)


def _missing_accuracy(model_name: str, missing: list[str], thresholds: GateThresholds) -> GateResult:
    which = " and ".join(f"version {v}" for v in missing) + (" have" if len(missing) > 1 else " has")
    command = f"mlflow-clip evaluate --model-uri models:/{model_name}/{missing[0]} --data <labelled images>"
    if thresholds.allow_missing_accuracy:
        return GateResult(
            "accuracy",
            True,
            f"passed without comparing (--allow-missing-accuracy): {which} no recorded accuracy",
            {"missing": missing},
        )
    return GateResult(
        "accuracy",
        False,
        f"{which} no recorded accuracy ({ACCURACY_TAG}), so the accuracy drop cannot be measured; record it with "
        f"`{command}`, or pass --allow-missing-accuracy",
        {"missing": missing},
    )
