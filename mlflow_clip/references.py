"""Reference predictions: images a model carries, with the predictions it must give on them.

`save_model` copies the package's sample images into the model's `reference/` folder and
records what the installed library predicts on them, with the baked classes and, when the
model has a text encoder, with labels sent per request. Both are covered by the manifest. The
promotion gate "loads and predicts" then runs the version the way serving will (its own code
and settings, in a separate process without torch) and compares.

    >>> probe = run_probe("path/to/model")  # doctest: +SKIP
    >>> compare_with_reference(read_reference("path/to/model"), probe, tolerance=1e-4)  # doctest: +SKIP
    []
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.package_data import sample_image_paths
from mlflow_clip.serving.contract import (
    FLAVOR_NAME,
    ONNX_FILE_NAME,
    TEXT_ENCODER_FILE_NAME,
    VOCAB_FILE_NAME,
    FlavorKey,
)
from mlflow_clip.serving.manifest import read_mlmodel

REFERENCE_DIR = "reference"
PREDICTIONS_FILE = f"{REFERENCE_DIR}/predictions.json"
TOP_K = 5
PER_REQUEST_CLASSES = 10
PER_REQUEST_TEMPLATES = ["{}"]
PROBE_TIMEOUT_SECONDS = 600.0


def write_reference(model_dir: Path, config, settings, has_text_encoder: bool) -> str:
    """Copy the sample images into `model_dir/reference` and record the predictions on them."""
    from mlflow_clip.serving.classifier import ZeroShotClassifier
    from mlflow_clip.serving.runtime import RuntimeSettings

    folder = model_dir / REFERENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for source in sample_image_paths():
        shutil.copyfile(source, folder / source.name)
        names.append(source.name)
    images = [(folder / name).read_bytes() for name in names]
    # The model's own runtime (a bf16 model's predictions are recorded at bf16, as it serves), on the CPU.
    cpu = RuntimeSettings(providers=("CPUExecutionProvider",), jpeg_draft=settings.jpeg_draft, runtime=settings.runtime)
    text_encoder = _text_encoder(model_dir, config, cpu) if has_text_encoder else None
    classifier = ZeroShotClassifier(model_dir / ONNX_FILE_NAME, config, cpu, text_encoder=text_encoder)
    try:
        top_k = min(TOP_K, len(config.classes))
        record: dict[str, Any] = {
            "images": names,
            "top_k": top_k,
            "baked": _rows(classifier.predict(images, top_k=top_k)),
        }
        if text_encoder is not None:
            classes = list(config.classes[:PER_REQUEST_CLASSES])
            k = min(TOP_K, len(classes))
            out = classifier.predict(images, top_k=k, classes=classes, templates=PER_REQUEST_TEMPLATES)
            record["per_request"] = {
                "classes": classes,
                "templates": PER_REQUEST_TEMPLATES,
                "top_k": k,
                "rows": _rows(out),
            }
    finally:
        classifier.close()
    (model_dir / PREDICTIONS_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return PREDICTIONS_FILE


def _text_encoder(model_dir: Path, config, settings):
    from mlflow_clip.serving.text import TextEncoder

    return TextEncoder(
        model_dir / TEXT_ENCODER_FILE_NAME,
        model_dir / VOCAB_FILE_NAME,
        config.context_length,
        settings,
        tokenizer=config.tokenizer,
    )


def _rows(frame) -> list[dict[str, Any]]:
    return [
        {"label": label, "top_labels": list(labels), "top_scores": [float(s) for s in scores]}
        for label, labels, scores in zip(frame["label"], frame["top_labels"], frame["top_scores"])
    ]


def read_reference(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded reference of a model directory (None for models saved before references)."""
    conf = (read_mlmodel(model_dir).get("flavors") or {}).get(FLAVOR_NAME) or {}
    name = conf.get(FlavorKey.REFERENCE)
    if not name:
        return None
    return json.loads((Path(model_dir) / name).read_text(encoding="utf-8"))


# Runs in a fresh interpreter with torch made unimportable, as on a serving machine: loads the
# model through MLflow (so with its own code and settings) and predicts on its reference images.
_PROBE = r"""
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "clip"}:
            raise ImportError(name + " is blocked: serving must not import it")
sys.meta_path.insert(0, _Block())
import pandas as pd
import mlflow
root, reference = sys.argv[1], json.loads(sys.argv[2])
model = mlflow.pyfunc.load_model(root)
images = [open(root + "/reference/" + name, "rb").read() for name in reference["images"]]
def rows(params):
    out = model.predict(pd.DataFrame({"image": images}), params=params)
    return [{"label": l, "top_labels": list(t), "top_scores": [float(s) for s in p]}
            for l, t, p in zip(out["label"], out["top_labels"], out["top_scores"])]
result = {"baked": rows({"top_k": reference["top_k"]})}
if "per_request" in reference:
    request = reference["per_request"]
    result["per_request"] = {"rows": rows({"top_k": request["top_k"], "classes": request["classes"],
                                           "templates": request["templates"][0]})}
print("MLFLOW_CLIP_PROBE " + json.dumps(result))
"""


class ProbeError(MlflowClipError, RuntimeError):
    """The version could not be loaded or could not predict in a fresh serving process."""


def run_probe(
    model_dir: str | os.PathLike, reference: Mapping[str, Any], timeout: float = PROBE_TIMEOUT_SECONDS
) -> dict:
    """Load `model_dir` with MLflow in a new process (torch blocked) and predict on its
    reference images; the predictions, in the reference's layout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    request = {k: reference[k] for k in ("images", "top_k", "per_request") if k in reference}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(model_dir), json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(model_dir),
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(f"loading and predicting took longer than {timeout:.0f} s") from None
    for line in done.stdout.splitlines():
        if line.startswith("MLFLOW_CLIP_PROBE "):
            return json.loads(line[len("MLFLOW_CLIP_PROBE ") :])
    error = [line for line in done.stderr.strip().splitlines() if line.strip()]
    raise ProbeError(error[-1][:500] if error else f"the serving process exited with code {done.returncode}")


def compare_with_reference(reference: Mapping[str, Any], probe: Mapping[str, Any], tolerance: float) -> list[str]:
    """Each way the probe's predictions differ from the reference beyond `tolerance`."""
    problems = _compare_rows(
        "baked classes", reference["images"], reference["baked"], probe.get("baked", []), tolerance
    )
    if "per_request" in reference:
        served = (probe.get("per_request") or {}).get("rows", [])
        problems += _compare_rows(
            "per-request labels", reference["images"], reference["per_request"]["rows"], served, tolerance
        )
    return problems


def _compare_rows(what: str, names, expected, served, tolerance: float) -> list[str]:
    if len(served) != len(expected):
        return [f"{what}: {len(served)} predictions for {len(expected)} reference images"]
    problems = []
    for name, want, got in zip(names, expected, served):
        diff = _score_difference(want, got)
        margin = want["top_scores"][0] - (want["top_scores"][1] if len(want["top_scores"]) > 1 else 0.0)
        if got["label"] != want["label"] and margin > 2 * tolerance:
            problems.append(f"{what}: {name} is {got['label']!r}, the reference says {want['label']!r}")
        elif diff > tolerance:
            problems.append(f"{what}: {name} scores differ from the reference by {diff:.2e} > {tolerance:.0e}")
    return problems


def _score_difference(want: Mapping[str, Any], got: Mapping[str, Any]) -> float:
    """The largest difference over the reference's top-k labels; a label that left the served
    top-k scores at most the served k-th score."""
    scores = dict(zip(got["top_labels"], got["top_scores"]))
    floor = min(got["top_scores"], default=0.0)
    return max(
        (abs(scores[label] - s) if label in scores else max(0.0, s - floor))
        for label, s in zip(want["top_labels"], want["top_scores"])
    )


def max_score_difference(reference: Mapping[str, Any], probe: Mapping[str, Any]) -> float:
    """The largest |served - reference| top-k score, over both prediction kinds."""
    pairs = list(zip(reference.get("baked", []), probe.get("baked", [])))
    if "per_request" in reference and probe.get("per_request"):
        pairs += list(zip(reference["per_request"]["rows"], probe["per_request"]["rows"]))
    return max((_score_difference(want, got) for want, got in pairs), default=0.0)
