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
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from mlflow_clip.errors import ProbeError
from mlflow_clip.package_data import sample_image_paths
from mlflow_clip.serving.contract import (
    FLAVOR_NAME,
    ONNX_FILE_NAME,
    TEXT_ENCODER_FILE_NAME,
    FlavorKey,
)
from mlflow_clip.serving.manifest import read_mlmodel
from mlflow_clip.serving.text_tokenizers import tokenizer_file_name

REFERENCE_DIR = "reference"
PREDICTIONS_FILE = f"{REFERENCE_DIR}/predictions.json"
TOP_K = 5
PER_REQUEST_CLASSES = 10
PER_REQUEST_TEMPLATES = ["{}"]
PROBE_TIMEOUT_SECONDS = 600.0


def write_reference(model_dir: Path, config, settings, has_text_encoder: bool, precisions=None) -> str:
    """Copy the sample images into `model_dir/reference` and record the predictions on them; for a
    model gated at several `precisions` (MLmodel's table), those of each one too (`variants`)."""
    from mlflow_clip.serving.runtime import RuntimeSettings
    from mlflow_clip.serving.variants import choose_variant

    folder = model_dir / REFERENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for source in sample_image_paths():
        shutil.copyfile(source, folder / source.name)
        names.append(source.name)
    images = [(folder / name).read_bytes() for name in names]
    # The model's own runtime (a bf16 model's predictions are recorded at bf16, as it serves), on the CPU.
    cpu = RuntimeSettings(providers=("CPUExecutionProvider",), jpeg_draft=settings.jpeg_draft, runtime=settings.runtime)
    record = {"images": names, **_predictions(model_dir, ONNX_FILE_NAME, config, cpu, has_text_encoder, images)}
    for precision in precisions or {}:
        if precision != config.precision:  # each precision as serving runs it when pinned to it
            variant = choose_variant(precisions, replace(cpu, precision=precision))
            served, served_config = variant.apply(replace(cpu, precision=precision), cpu, config)
            predicted = _predictions(model_dir, variant.onnx_model, served_config, served, has_text_encoder, images)
            record.setdefault("variants", {})[precision] = predicted
    (model_dir / PREDICTIONS_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return PREDICTIONS_FILE


def _predictions(model_dir: Path, onnx_file: str, config, settings, has_text_encoder: bool, images) -> dict[str, Any]:
    from mlflow_clip.serving.classifier import ZeroShotClassifier

    text_encoder = _text_encoder(model_dir, config, settings) if has_text_encoder else None
    classifier = ZeroShotClassifier(model_dir / onnx_file, config, settings, text_encoder=text_encoder)
    try:
        top_k = min(TOP_K, len(config.classes))
        record: dict[str, Any] = {"top_k": top_k, "baked": _rows(classifier.predict(images, top_k=top_k))}
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
    return record


def _text_encoder(model_dir: Path, config, settings):
    from mlflow_clip.serving.text import TextEncoder

    return TextEncoder.for_config(
        model_dir / TEXT_ENCODER_FILE_NAME, model_dir / tokenizer_file_name(config.tokenizer), config, settings
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


# Runs in a fresh interpreter with torch made unimportable, as on a serving machine. It imports
# what serving imports, says so, then waits for one request (a verified model directory and its
# reference): it loads the model through MLflow (so with its own code and settings) and predicts
# on its reference images. The working directory is never searched for modules.
_PROBE = r"""
import sys
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
import importlib.abc, json, os, time
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "clip"}:
            raise ImportError(name + " is blocked: serving must not import it")
sys.meta_path.insert(0, _Block())
import pandas as pd
import mlflow.pyfunc
print("MLFLOW_CLIP_PROBE_READY " + json.dumps(time.monotonic()), flush=True)
request = json.loads(sys.stdin.readline())
root, reference = request["root"], request["reference"]
os.chdir(root)
started = time.monotonic()
# suppress_warnings skips only MLflow's advisory checks of the installed packages against the
# model's requirements, which scan every installed distribution (seconds in a large env)
model = mlflow.pyfunc.load_model(root, suppress_warnings=True)
loaded = time.monotonic()
images = [open(os.path.join(root, "reference", name), "rb").read() for name in reference["images"]]
def rows(params):
    out = model.predict(pd.DataFrame({"image": images}), params=params)
    return [{"label": l, "top_labels": list(t), "top_scores": [float(s) for s in p]}
            for l, t, p in zip(out["label"], out["top_labels"], out["top_scores"])]
served = getattr(getattr(model.get_raw_model(), "config", None), "precision", "")
result = {"baked": rows({"top_k": reference["top_k"]}), "precision": served}
if "per_request" in reference:
    request = reference["per_request"]
    result["per_request"] = {"rows": rows({"top_k": request["top_k"], "classes": request["classes"],
                                           "templates": request["templates"][0]})}
result["seconds"] = {"load": loaded - started, "predict": time.monotonic() - loaded}
print("MLFLOW_CLIP_PROBE " + json.dumps(result))
"""
_READY, _RESULT = "MLFLOW_CLIP_PROBE_READY ", "MLFLOW_CLIP_PROBE "


class ServingProbe:
    """A fresh serving process (torch blocked), started ahead: its interpreter and imports load
    while the caller downloads and verifies a model, and only then is it given the model.

        >>> with ServingProbe() as probe:  # doctest: +SKIP
        ...     verify(model_dir)
        ...     predictions = probe.run(model_dir, read_reference(model_dir))
        >>> predictions["seconds"]  # doctest: +SKIP
        {'startup': 1.9, 'load': 0.4, 'predict': 0.3}
    """

    def __init__(self, timeout: float = PROBE_TIMEOUT_SECONDS):
        self.timeout = timeout
        self.started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )

    def run(self, model_dir: str | os.PathLike, reference: Mapping[str, Any]) -> dict:
        """Load the verified `model_dir` and predict on its reference images; the predictions in
        the reference's layout, and `seconds`: startup (interpreter and imports), load, predict."""
        request = {k: reference[k] for k in ("images", "top_k", "per_request") if k in reference}
        try:
            out, err = self._process.communicate(
                json.dumps({"root": str(model_dir), "reference": request}) + "\n", timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            self.close()
            raise ProbeError(f"loading and predicting took longer than {self.timeout:.0f} s") from None
        ready = [line[len(_READY) :] for line in out.splitlines() if line.startswith(_READY)]
        for line in out.splitlines():
            if line.startswith(_RESULT):
                result = json.loads(line[len(_RESULT) :])
                result["seconds"]["startup"] = float(ready[0]) - self.started if ready else None
                return result
        error = [line for line in err.strip().splitlines() if line.strip()]
        raise ProbeError(
            error[-1][:500] if error else f"the serving process exited with code {self._process.returncode}"
        )

    def close(self) -> None:
        """Stop the process if it is still waiting (the model failed verification) or running."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> ServingProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_probe(
    model_dir: str | os.PathLike, reference: Mapping[str, Any], timeout: float = PROBE_TIMEOUT_SECONDS
) -> dict:
    """Load `model_dir` with MLflow in a new process (torch blocked) and predict on its
    reference images; the predictions, in the reference's layout."""
    with ServingProbe(timeout) as probe:
        return probe.run(model_dir, reference)


def compare_with_reference(reference: Mapping[str, Any], probe: Mapping[str, Any], tolerance: float) -> list[str]:
    """Each way the probe's predictions differ from the reference beyond `tolerance` (the
    reference of the precision it served, for a model gated at several)."""
    reference = _served_reference(reference, probe)
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
    reference = _served_reference(reference, probe)
    pairs = list(zip(reference.get("baked", []), probe.get("baked", [])))
    if "per_request" in reference and probe.get("per_request"):
        pairs += list(zip(reference["per_request"]["rows"], probe["per_request"]["rows"]))
    return max((_score_difference(want, got) for want, got in pairs), default=0.0)


def _served_reference(reference: Mapping[str, Any], probe: Mapping[str, Any]) -> Mapping[str, Any]:
    variant = (reference.get("variants") or {}).get(probe.get("precision"))
    return {**reference, **variant} if variant else reference
