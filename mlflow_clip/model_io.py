"""How a model directory is written: the flavor configuration, the copied graphs and tokenizer
files, the settings an operator may override, and MLmodel with its manifest.

`mlflow_clip.flavor` keeps MLflow's public surface (`save_model`, `log_model`, `load_model`,
the requirements) and calls these, as MLflow's `transformers` flavor keeps its file handling in
`model_io.py`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlflow_clip.serving.contract import (
    CONFIG_FILE_NAME,
    FLAVOR_NAME,
    ONNX_FILE_NAME,
    TEXT_ENCODER_FILE_NAME,
    VOCAB_FILE_NAME,
    VOCAB_LICENSE_FILE_NAME,
    ClassifierConfig,
    FlavorKey,
    sha256_file,
)
from mlflow_clip.serving.limits import InputLimits
from mlflow_clip.serving.loader import VERIFY_SETTING, ModelError
from mlflow_clip.serving.manifest import build_manifest, read_mlmodel
from mlflow_clip.serving.runtime import RuntimeSettings
from mlflow_clip.serving.text_tokenizers import tokenizer_file_name

__all__ = [
    "as_limits",
    "as_settings",
    "checked_precisions",
    "copy_text_encoder",
    "flavor_conf",
    "overridable_settings",
    "refuse_external_data",
    "save_with_manifest",
]


def save_with_manifest(mlflow_model: Model, path: Path) -> None:
    """Write MLmodel, then the manifest of the whole directory into it."""
    mlmodel_path = path / MLMODEL_FILE_NAME
    mlflow_model.save(str(mlmodel_path))
    manifest = build_manifest(path, read_mlmodel(path))
    mlflow_model.flavors[FLAVOR_NAME][FlavorKey.MANIFEST] = manifest
    mlflow_model.save(str(mlmodel_path))


def refuse_external_data(onnx_path: str | os.PathLike) -> None:
    """Refuse a graph whose weights live outside its own file: a model directory must be
    self-contained, and a reference outside it could read any file of the serving machine."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    external = [t.name for t in _all_tensors(model) if uses_external_data(t)]
    if external:
        raise ModelError(
            f"Received {Path(onnx_path).name} whose tensors {external[:3]} keep their data in side files; "
            "expected a self-contained graph. Save it with onnx.save_model(model, path, save_as_external_data=False).",
            error_code=INVALID_PARAMETER_VALUE,
        )


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def overridable_settings(settings: RuntimeSettings, limits: InputLimits) -> dict[str, Any]:
    runtime = {k: v for k, v in settings.to_dict().items() if k != "extra"}
    return {**runtime, **limits.to_dict(), VERIFY_SETTING: True}


def as_settings(runtime: RuntimeSettings | dict | None) -> RuntimeSettings:
    if isinstance(runtime, RuntimeSettings):
        return runtime
    try:
        return RuntimeSettings.from_dict(runtime)
    except (TypeError, ValueError) as e:
        raise ModelError(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def as_limits(limits: InputLimits | dict | None) -> InputLimits:
    if isinstance(limits, InputLimits):
        return limits
    try:
        return InputLimits.from_dict(limits)
    except (TypeError, ValueError) as e:
        raise ModelError(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def copy_text_encoder(source: Path, path: Path, config: ClassifierConfig, tokenizer_files) -> None:
    from mlflow_clip.package_data import default_vocab_license_path, default_vocab_path

    shutil.copyfile(source, path / TEXT_ENCODER_FILE_NAME)
    name = tokenizer_file_name(config.tokenizer)
    if name == VOCAB_FILE_NAME:  # CLIP's byte-pair encoding: the package's vocabulary
        shutil.copyfile(default_vocab_path(), path / VOCAB_FILE_NAME)
        shutil.copyfile(default_vocab_license_path(), path / VOCAB_LICENSE_FILE_NAME)
        return
    files = [Path(file) for file in tokenizer_files or ()]
    if name not in {file.name for file in files}:
        raise ModelError(
            f"Received tokenizer_files={[file.name for file in files]} for a model whose tokenizer is "
            f"{config.tokenizer!r}; expected {name} among them (the exporter writes it).",
            error_code=INVALID_PARAMETER_VALUE,
        )
    for file in files:
        shutil.copyfile(file, path / file.name)


def _text_conf(path: Path, config: ClassifierConfig) -> dict[str, Any]:
    vocab = tokenizer_file_name(config.tokenizer)
    return {
        FlavorKey.TEXT_ENCODER: TEXT_ENCODER_FILE_NAME,
        FlavorKey.TEXT_ENCODER_SHA256: sha256_file(path / TEXT_ENCODER_FILE_NAME),
        FlavorKey.TOKENIZER_VOCAB: vocab,
        FlavorKey.TOKENIZER_VOCAB_SHA256: sha256_file(path / vocab),
    }


def flavor_conf(config, settings, limits, path, has_text_encoder: bool) -> dict[str, Any]:
    from mlflow_clip.version import __version__

    return {
        **(_text_conf(path, config) if has_text_encoder else {}),
        "embedding_output": config.embedding_output,
        "context_length": config.context_length,
        FlavorKey.VERSION: __version__,
        FlavorKey.ONNX_MODEL: ONNX_FILE_NAME,
        FlavorKey.ONNX_SHA256: sha256_file(path / ONNX_FILE_NAME),
        FlavorKey.CONFIG: CONFIG_FILE_NAME,
        FlavorKey.CLASSES: list(config.classes),
        "templates": config.templates,
        FlavorKey.CLIP_MODEL: config.clip_model,
        "input_resolution": config.input_resolution,
        "mean": list(config.mean),
        "std": list(config.std),
        "logit_scale": config.logit_scale,
        # softmax (one label per image) or sigmoid (each class on its own, SigLIP's), with its bias
        FlavorKey.HEAD: config.head,
        "logit_bias": config.logit_bias,
        FlavorKey.TOKENIZER: config.tokenizer,
        "opset": config.opset,
        FlavorKey.PRECISION: config.precision,
        FlavorKey.PROVIDERS: list(settings.providers),
        FlavorKey.RUNTIME: settings.to_dict(),
        FlavorKey.LIMITS: limits.to_dict(),
    }


def checked_precisions(path: Path, precisions: Mapping[str, Mapping[str, Any]] | None) -> dict | None:
    """The table of precisions, each graph it names present in the model and self-contained."""
    if not precisions:
        return None
    for precision, entry in precisions.items():
        graph = path / str(entry.get("onnx_model", ""))
        if not graph.is_file() or graph.parent != path:
            raise ModelError(
                f"Received precisions with {precision} served by {entry.get('onnx_model')!r}; expected "
                f"{ONNX_FILE_NAME} or a graph passed in extra_files.",
                error_code=INVALID_PARAMETER_VALUE,
            )
        refuse_external_data(graph)
    return {name: dict(entry) for name, entry in precisions.items()}
