"""The `mlflow_clip` MLflow flavor: a torch-free pyfunc that serves CLIP zero-shot ONNX models.

The model directory is the contract. `save_model` writes everything serving needs (the ONNX
graph, `clip_classifier.json` with classes, normalization and input size, the runtime settings
in MLmodel, and this package's serving modules under `code/`), and the loader only reads it back.

    >>> import mlflow_clip
    >>> mlflow_clip.save_model("model.onnx", "clip_model")  # doctest: +SKIP
    >>> classifier = mlflow_clip.load_model("clip_model")  # doctest: +SKIP
    >>> classifier.predict([open("cat.jpg", "rb").read()])["label"][0]  # doctest: +SKIP
    'a cat'
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import (
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement

from mlflow_clip import FLAVOR_NAME
from mlflow_clip.classifier import InputLimits, InvalidInputError, ZeroShotClassifier
from mlflow_clip.config import CONFIG_FILE_NAME, ClassifierConfig, sha256_file
from mlflow_clip.runtime import RuntimeSettings

ONNX_FILE_NAME = "model.onnx"
_logger = logging.getLogger(__name__)

# The modules serving imports; save_model copies exactly these into the model's code/ folder,
# so a model loads on a machine that has never installed mlflow-clip (and has no torch).
SERVING_MODULES = (
    "__init__.py",
    "version.py",
    "flavor.py",
    "classifier.py",
    "config.py",
    "images.py",
    "preprocess.py",
    "resample.py",
    "runtime.py",
    "prompts.py",
    "client.py",
    "tokenizer.py",
    "text.py",
)
TEXT_ENCODER_FILE_NAME = "text_encoder.onnx"
PARAM_DEFAULTS: dict[str, Any] = {"top_k": 0, "on_error": "raise", "output": "full", "classes": [], "templates": ""}
# output="label" returns the labels alone (a Series), for tools that expect one prediction per row;
# output="embedding" returns one normalized image embedding per row (column `embedding`).
OUTPUT_CHOICES = ("full", "label", "embedding")
TEXT_COLUMN = "text"


def get_default_pip_requirements() -> list[str]:
    """The serving requirements: onnxruntime, numpy, Pillow and MLflow (plus the tokenizer's
    ftfy and regex); never torch."""
    return [_get_pinned_requirement(name) for name in ("mlflow", "onnxruntime", "numpy", "pillow", "ftfy", "regex")]


def get_default_conda_env() -> dict:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def default_signature() -> ModelSignature:
    """Input: a binary `image` column (or a `text` column, for text embeddings); params `top_k`,
    `on_error`, `output`, `classes` and `templates`; the output columns of classification."""
    inputs = Schema([ColSpec(DataType.binary, "image", required=False), ColSpec(DataType.string, TEXT_COLUMN, required=False)])
    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "score"),
            ColSpec(Array(DataType.double), "probabilities"),
            ColSpec(DataType.string, "error", required=False),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("top_k", DataType.long, PARAM_DEFAULTS["top_k"]),
            ParamSpec("on_error", DataType.string, PARAM_DEFAULTS["on_error"]),
            ParamSpec("output", DataType.string, PARAM_DEFAULTS["output"]),
            # Labels chosen per request (empty: the baked classes), and their templates: a preset
            # (none, photo, ensemble) or one template with {} (empty: the model's own templates).
            ParamSpec("classes", DataType.string, PARAM_DEFAULTS["classes"], (-1,)),
            ParamSpec("templates", DataType.string, PARAM_DEFAULTS["templates"]),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def save_model(
    onnx_model: str | os.PathLike,
    path: str | os.PathLike,
    conda_env: dict | str | None = None,
    code_paths: Sequence[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: Sequence[str] | str | None = None,
    extra_pip_requirements: Sequence[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    runtime: RuntimeSettings | dict | None = None,
    limits: InputLimits | dict | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    text_encoder: str | os.PathLike | None = None,
) -> None:
    """Save an ONNX classifier written by mlflow-clip's exporter as an MLflow model.

    `onnx_model` is the path of the `.onnx` file; its metadata (classes, normalization, input
    size) becomes the flavor configuration. `runtime` sets providers and thread counts,
    `limits` the per-request input limits; both can be overridden at load time.
    `text_encoder` is the exporter's text-encoder ONNX file: with it (and the tokenizer's
    vocabulary, copied alongside) the model also takes per-request labels and text input.
    """
    path = Path(path)
    config = ClassifierConfig.from_onnx(onnx_model)
    settings = _as_settings(runtime)
    input_limits = _as_limits(limits)
    _validate_and_prepare_target_save_path(str(path))
    code_dir_subpath = _copy_code(path, code_paths)
    shutil.copyfile(onnx_model, path / ONNX_FILE_NAME)
    if text_encoder is not None:
        _copy_text_encoder(Path(text_encoder), path)
    config.write(path)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, path / name)

    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = signature if signature is not None else default_signature()
    if input_example is not None:
        _save_example(mlflow_model, input_example, str(path))
    if metadata is not None:
        mlflow_model.metadata = metadata
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_clip.flavor",
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        code=code_dir_subpath,
        # The settings an operator may override at load time (`model_config=` or the
        # MLFLOW_PYFUNC_INFERENCE_CONFIG environment variable of `mlflow models serve`).
        model_config=_overridable(settings, input_limits),
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME, **_flavor_conf(config, settings, input_limits, path, code_dir_subpath, text_encoder is not None)
    )
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    _write_environment(path, conda_env, pip_requirements, extra_pip_requirements)


def _overridable(settings: RuntimeSettings, limits: InputLimits) -> dict[str, Any]:
    runtime = {k: v for k, v in settings.to_dict().items() if k != "extra"}
    return {**runtime, "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "max_rows": limits.max_rows}


def _as_settings(runtime: RuntimeSettings | dict | None) -> RuntimeSettings:
    if isinstance(runtime, RuntimeSettings):
        return runtime
    try:
        return RuntimeSettings.from_dict(runtime)
    except (TypeError, ValueError) as e:
        raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def _as_limits(limits: InputLimits | dict | None) -> InputLimits:
    if isinstance(limits, InputLimits):
        return limits
    unknown = sorted(set(limits or {}) - set(InputLimits.__dataclass_fields__))
    if unknown:
        raise MlflowException(
            f"Received unknown limits {unknown}; expected any of {sorted(InputLimits.__dataclass_fields__)}.",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return InputLimits(**(limits or {}))


def _copy_text_encoder(source: Path, path: Path) -> None:
    from mlflow_clip.tokenizer import VOCAB_FILE_NAME, VOCAB_LICENSE_FILE_NAME, default_vocab_license_path, default_vocab_path

    shutil.copyfile(source, path / TEXT_ENCODER_FILE_NAME)
    shutil.copyfile(default_vocab_path(), path / VOCAB_FILE_NAME)
    shutil.copyfile(default_vocab_license_path(), path / VOCAB_LICENSE_FILE_NAME)


def _text_conf(path: Path) -> dict[str, Any]:
    from mlflow_clip.tokenizer import VOCAB_FILE_NAME

    return {
        "text_encoder": TEXT_ENCODER_FILE_NAME,
        "text_encoder_sha256": sha256_file(path / TEXT_ENCODER_FILE_NAME),
        "tokenizer_vocab": VOCAB_FILE_NAME,
        "tokenizer_vocab_sha256": sha256_file(path / VOCAB_FILE_NAME),
    }


def _flavor_conf(config, settings, limits, path, code_dir_subpath, has_text_encoder: bool) -> dict[str, Any]:
    from mlflow_clip.version import __version__

    return {
        **(_text_conf(path) if has_text_encoder else {}),
        "embedding_output": config.embedding_output,
        "context_length": config.context_length,
        "mlflow_clip_version": __version__,
        "onnx_model": ONNX_FILE_NAME,
        "onnx_sha256": sha256_file(path / ONNX_FILE_NAME),
        "config": CONFIG_FILE_NAME,
        "classes": list(config.classes),
        "templates": config.templates,
        "clip_model": config.clip_model,
        "input_resolution": config.input_resolution,
        "mean": list(config.mean),
        "std": list(config.std),
        "logit_scale": config.logit_scale,
        "opset": config.opset,
        "precision": config.precision,
        "providers": list(settings.providers),
        "runtime": settings.to_dict(),
        "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "max_rows": limits.max_rows},
        "code": code_dir_subpath,
    }


def _copy_code(path: Path, code_paths: Sequence[str] | None) -> str:
    package_dir = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "mlflow_clip"
        staged.mkdir()
        for name in SERVING_MODULES:
            shutil.copyfile(package_dir / name, staged / name)
        return _validate_and_copy_code_paths([str(staged), *(code_paths or [])], str(path))


def _write_environment(path: Path, conda_env, pip_requirements, extra_pip_requirements) -> None:
    if conda_env is None:
        default_reqs = None if pip_requirements is not None else get_default_pip_requirements()
        conda_env, pip_reqs, constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_reqs, constraints = _process_conda_env(conda_env)
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


def log_model(
    onnx_model: str | os.PathLike,
    name: str | None = None,
    conda_env: dict | str | None = None,
    code_paths: Sequence[str] | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    await_registration_for: int = 300,
    pip_requirements: Sequence[str] | str | None = None,
    extra_pip_requirements: Sequence[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    runtime: RuntimeSettings | dict | None = None,
    limits: InputLimits | dict | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    text_encoder: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """Log an mlflow-clip ONNX classifier to the active run (and register it if asked).

    Returns MLflow's `ModelInfo`; `.registered_model_version` is set when registered.
    """
    import mlflow_clip.flavor

    return Model.log(
        artifact_path=None,
        name=name or "model",
        flavor=mlflow_clip.flavor,
        onnx_model=onnx_model,
        conda_env=conda_env,
        code_paths=code_paths,
        registered_model_name=registered_model_name,
        signature=signature,
        input_example=input_example,
        await_registration_for=await_registration_for,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        runtime=runtime,
        limits=limits,
        extra_files=extra_files,
        text_encoder=text_encoder,
        **kwargs,
    )


def load_model(model_uri: str, dst_path: str | None = None, model_config: dict | None = None) -> ZeroShotClassifier:
    """Load the native classifier (`.classes`, `.predict(images)`) from any MLflow model URI."""
    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    return _load_classifier(local_path, model_config)


def _load_classifier(local_path: str, model_config: dict | None = None) -> ZeroShotClassifier:
    conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    overrides = dict(model_config or {})
    limit_overrides = {k: overrides.pop(k) for k in list(overrides) if k in InputLimits.__dataclass_fields__}
    try:
        settings = RuntimeSettings.from_dict(conf.get("runtime")).with_overrides(overrides)
    except ValueError as e:
        raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e
    limits = InputLimits(**{**conf.get("limits", {}), **limit_overrides})
    onnx_path = Path(local_path) / conf.get("onnx_model", ONNX_FILE_NAME)
    if not onnx_path.exists():
        raise MlflowException(f"The model directory {local_path} has no {onnx_path.name}.", RESOURCE_DOES_NOT_EXIST)
    config = ClassifierConfig.read(local_path)
    text_encoder = None
    if conf.get("text_encoder"):
        from mlflow_clip.text import TextEncoder

        text_encoder = TextEncoder(
            Path(local_path) / conf["text_encoder"],
            Path(local_path) / conf["tokenizer_vocab"],
            config.context_length,
            settings,
        )
    return ZeroShotClassifier(onnx_path, config, settings, limits, text_encoder=text_encoder)


def _load_pyfunc(path: str, model_config: dict | None = None) -> "_ClipPyfuncWrapper":
    """Called by `mlflow.pyfunc.load_model` with the model directory."""
    return _ClipPyfuncWrapper(_load_classifier(path, model_config))


class ClientInputError(MlflowException):
    """A bad request, reported as HTTP 400 / INVALID_PARAMETER_VALUE.

    MLflow's scoring server prefixes error messages with a repr of the request, which would
    echo (part of) the image bytes back to the client; this error keeps its own message only.
    """

    def __init__(self, message: str):
        self._clean_message = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._clean_message

    @message.setter
    def message(self, value: str) -> None:  # the scoring server's prefixed copy is dropped
        pass


class _ClipPyfuncWrapper:
    """The pyfunc face of the classifier: `predict(data, params)`."""

    def __init__(self, classifier: ZeroShotClassifier):
        self.classifier = classifier

    def get_raw_model(self) -> ZeroShotClassifier:
        return self.classifier

    def predict(self, data: Any, params: dict[str, Any] | None = None):
        options = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        output = options["output"]
        if output not in OUTPUT_CHOICES:
            raise ClientInputError(f"Received output={output!r}; expected one of {list(OUTPUT_CHOICES)}.")
        try:
            texts = _text_rows(data)
            if texts is not None:
                return self.classifier.embed_text(texts)
            if output == "embedding":
                return self.classifier.embed_images(data, on_error=str(options["on_error"]))
            out = self.classifier.predict(
                data,
                top_k=int(options["top_k"]),
                on_error=str(options["on_error"]),
                classes=options["classes"] or None,
                templates=options["templates"] or None,
            )
        except InvalidInputError as e:
            raise ClientInputError(str(e)) from None
        return out["label"] if output == "label" else out


def _text_rows(data: Any) -> list[Any] | None:
    """The texts of a text-only request (a `text` column and no images), else None."""
    import pandas as pd

    if isinstance(data, dict) and TEXT_COLUMN in data:
        data = pd.DataFrame({k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in data.items()})
    if not isinstance(data, pd.DataFrame) or TEXT_COLUMN not in data.columns:
        return None
    if "image" in data.columns and data["image"].notna().any():
        if data[TEXT_COLUMN].notna().any():
            raise InvalidInputError(
                "Received both 'image' and 'text' values; send images (to classify or embed them) "
                "or texts (to embed them), one kind per request."
            )
        return None
    return list(data[TEXT_COLUMN])
