"""The benchmark's models: each (model, precision) exported once into the work dir (in a child
process: exporting needs torch and clip), saved, registered, and its zero-shot head kept for row (a).

A build is reused while its key (model, precision, templates, classes, text encoder, and the
serving code a saved model carries) is current: a model saved with older serving code would
measure that code, not this checkout's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.options import BenchmarkOptions
from benchmarks.worker import run_child

# Full-size architectures get random weights and these classes; the demo model gets its own.
BENCHMARK_CLASSES: tuple[str, ...] = (
    "a person",
    "a car",
    "a dog",
    "a cat",
    "a bird",
    "a tree",
    "a house",
    "a boat",
    "a bicycle",
    "a flower",
)
TEMPLATES = "photo"


def model_slug(model: str) -> str:
    """A file-name-safe name: ViT-B/32 -> ViT-B-32; a checkpoint path -> its file stem."""
    name = Path(model).stem if Path(model).is_file() else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _model_dir(work_dir: Path, model: str, precision: str) -> Path:
    return work_dir / "models" / model_slug(model) / precision


def _build_key(model: str, precision: str) -> dict[str, Any]:
    from mlflow_clip.flavor import serving_package_name

    return {
        "model": model,
        "precision": precision,
        "templates": TEMPLATES,
        "classes": list(classes_for(model)),
        "text_encoder": precision == "fp32",
        "serving": serving_package_name(),
    }


def classes_for(model: str) -> tuple[str, ...]:
    """The classes a model is built with: the demo model's own, else `BENCHMARK_CLASSES`."""
    if model == "demo":
        from mlflow_clip.demo_data import DEMO_CLASSES

        return DEMO_CLASSES
    return BENCHMARK_CLASSES


def read_build(work_dir: Path, model: str, precision: str) -> dict[str, Any] | None:
    """The cached build of `model` at `precision` if it is complete and current."""
    path = _model_dir(work_dir, model, precision) / "build.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    current = info.get("key") == _build_key(model, precision) and info.get("status") == "ok"
    return info if current and (Path(info["model_dir"]) / "MLmodel").exists() else None


def ensure_models(
    options: BenchmarkOptions, models: Sequence[str], precisions: Sequence[str], progress: Callable[[str], None]
) -> dict:
    """Build each (model, precision) once into the work dir; returns {(model, precision): build info}."""
    builds: dict[tuple[str, str], dict] = {}
    for model in models:
        missing = [p for p in precisions if options.rebuild or read_build(options.work_dir, model, p) is None]
        if missing:
            progress(f"building {model} ({', '.join(missing)}) in {options.work_dir / 'models'}")
            spec = {"model": model, "precisions": missing, "work_dir": str(options.work_dir)}
            result = run_child("build", spec, options.work_dir, f"build-{model_slug(model)}", options.child_timeout)
            for precision in missing:
                info = result.get("builds", {}).get(precision) or {"status": "failed", "note": result.get("error", "")}
                builds[(model, precision)] = info
        for precision in precisions:
            builds.setdefault((model, precision), read_build(options.work_dir, model, precision) or {})
    return builds


def task_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: export the model at each precision, save it, register it, keep the torch head."""
    from mlflow_clip.export.checkpoints import ARCHITECTURES, save_random_checkpoint

    work_dir, model = Path(spec["work_dir"]), spec["model"]
    clip_spec = model
    if model in ARCHITECTURES:
        checkpoint = work_dir / "checkpoints" / f"{model_slug(model)}.pt"
        if not checkpoint.exists():
            save_random_checkpoint(model, checkpoint.with_suffix(".part"))
            checkpoint.with_suffix(".part").replace(checkpoint)
        clip_spec = str(checkpoint)
    return {"builds": {p: _build_one(work_dir, model, clip_spec, p) for p in spec["precisions"]}}


def _build_one(work_dir: Path, model: str, clip_spec: str, precision: str) -> dict[str, Any]:
    import shutil

    from mlflow_clip import flavor
    from mlflow_clip.export.graph import DEFAULT_OPSET
    from mlflow_clip.export.job import build_classifier
    from mlflow_clip.serving.openvino_runtime import openvino_runs_bf16

    if precision == "bf16" and not openvino_runs_bf16():  # the export refuses it: its gates would measure fp32
        return {"status": "skipped", "note": "OpenVINO has no bf16 on this CPU (it needs AVX-512)"}
    out = _model_dir(work_dir, model, precision)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # Only the fp32 model ships the text encoder: it feeds the per-request labels row.
    kwargs = {"text_encoder": True} if precision == "fp32" else {"precision": precision, "text_encoder": False}
    try:
        built = build_classifier(
            classes_for(model),
            model=clip_spec,
            templates=TEMPLATES,
            opset=DEFAULT_OPSET,
            out_dir=out / "export",
            **kwargs,
        )
    except TypeError as e:
        return {"status": "skipped", "note": f"build_classifier does not build precision={precision!r} yet ({e})"}
    except Exception as e:
        return {"status": "failed", "note": f"{type(e).__name__}: {str(e)[:400]}"}
    flavor.save_model(
        built.onnx_path, out / "model", text_encoder=built.text_encoder_path, runtime=built.runtime_settings()
    )
    np.savez(
        out / "head.npz", text_features=built.head.text_features.t().numpy(), logit_scale=float(built.head.logit_scale)
    )
    info = {
        "status": "ok",
        "key": _build_key(model, precision),
        "model_dir": str(out / "model"),
        "head": str(out / "head.npz"),
        "clip_spec": clip_spec,
        "export_seconds": built.export_seconds,
        "onnx_mb": (out / "model" / "model.onnx").stat().st_size / 1e6,
        "model_uri": _register(work_dir, built.onnx_path, f"benchmark-{model_slug(model)}-{precision}"),
    }
    shutil.rmtree(out / "export", ignore_errors=True)
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info


def registry_uri(work_dir: Path) -> str:
    """The work dir's own MLflow registry, where builds register their models."""
    return f"sqlite:///{work_dir / 'registry' / 'mlflow.db'}"


def _register(work_dir: Path, onnx_path: Path, name: str) -> str:
    import mlflow

    import mlflow_clip

    (work_dir / "registry").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(registry_uri(work_dir))
    mlflow.set_registry_uri(registry_uri(work_dir))
    experiment = mlflow.get_experiment_by_name("benchmark")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else mlflow.create_experiment("benchmark", artifact_location=(work_dir / "registry" / "artifacts").as_uri())
    )
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow_clip.log_model(onnx_path, name="model", registered_model_name=name)
    return f"models:/{name}/{info.registered_model_version}"


def flavor_conf(model_dir: Path) -> dict[str, Any]:
    """The `mlflow_clip` flavor's section of a saved model's MLmodel."""
    import yaml

    return yaml.safe_load((Path(model_dir) / "MLmodel").read_text())["flavors"]["mlflow_clip"]


def pyfunc_config_keys(model_dir: str | Path) -> set[str]:
    """The keys a model accepts as `model_config` at load time (MLflow ignores any others)."""
    import yaml

    mlmodel = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return set((mlmodel["flavors"].get("python_function", {}).get("config") or {}))
