"""Loading a model directory for serving: the pyfunc loader MLflow calls, and its wrapper.

`mlflow.pyfunc.load_model`, `mlflow models serve`, `spark_udf` and MLServer import this module
from the model's own copy of the serving package (under `code/`, with a name of its own), so a
model is always served by the code it was saved, verified and promoted with. Loading first checks
the directory against its manifest (opt out with `model_config={"verify": False}` or
`MLFLOW_CLIP_VERIFY=0`), then reads the contract back: nothing is recomputed.

    >>> model = mlflow.pyfunc.load_model("models:/clip-zero-shot@production")  # doctest: +SKIP
    >>> model.predict(pd.DataFrame({"image": [jpeg_bytes]}))["label"][0]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from . import VERIFY_ENV
from .classifier import ZeroShotClassifier
from .contract import CODE_DIR_NAME, FLAVOR_NAME, ONNX_FILE_NAME, ClassifierConfig, FlavorKey
from .deadline import DeadlineExceeded
from .errors import MlflowClipError, ModelFileError, shown
from .fast_jpeg import fast_jpeg_status
from .integrity import forget_code_dir
from .limits import InputLimits
from .manifest import check_manifest, read_mlmodel, recorded_manifest
from .preprocess import native_status
from .rows import InvalidInputError
from .runtime import RuntimeSettings
from .signature import OUTPUT_CHOICES, PARAM_DEFAULTS, TEXT_COLUMN
from .text import TextEncoder
from .v2 import called_by_mlserver, mlserver_error, v2_table
from .variants import choose_variant, int8_kernels_warning

_logger = logging.getLogger("mlflow_clip.serving.loader")

VERIFY_SETTING = "verify"


def load_classifier(
    local_path: str | os.PathLike, model_config: Mapping[str, Any] | None = None, pinned: str | None = None
) -> ZeroShotClassifier:
    """The classifier of a model directory: verified against its manifest, then read back.

    `model_config` overrides runtime settings and limits (and `verify`), on top of the
    `MLFLOW_CLIP_*` environment, on top of what MLmodel records. `pinned`: the manifest digest
    the registered version records (its `manifest_sha256` tag), which the manifest must have.
    """
    root = Path(local_path)
    mlmodel = read_mlmodel(root)
    conf = (mlmodel.get("flavors") or {}).get(FLAVOR_NAME)
    if not isinstance(conf, dict):
        raise _invalid(f"{root} is not an mlflow_clip model: its MLmodel has no {FLAVOR_NAME} flavor.")
    overrides = dict(model_config or {})
    saved = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("config") or {}
    verify = verify_setting(overrides.pop(VERIFY_SETTING, None), saved.get(VERIFY_SETTING))
    limit_overrides = {k: overrides.pop(k) for k in list(overrides) if k in InputLimits.names()}
    _verify(root, mlmodel, conf, verify, pinned)
    variant = None
    try:
        saved_settings = RuntimeSettings.from_dict(conf.get(FlavorKey.RUNTIME))
        settings = saved_settings.with_overrides(overrides)
        limits = InputLimits.from_dict({**conf.get(FlavorKey.LIMITS, {}), **limit_overrides})
        config = ClassifierConfig.read(root)
        if conf.get(FlavorKey.PRECISIONS):  # gated at several precisions: the fastest native here
            variant = choose_variant(conf[FlavorKey.PRECISIONS], settings)
            settings, config = variant.apply(settings, saved_settings, config)
    except (TypeError, ValueError) as e:
        raise _invalid(str(e)) from e
    onnx_path = _model_file(root, variant.onnx_model if variant else conf.get(FlavorKey.ONNX_MODEL, ONNX_FILE_NAME))
    text_encoder = None
    if conf.get(FlavorKey.TEXT_ENCODER):
        text_encoder = TextEncoder.for_config(
            _model_file(root, conf[FlavorKey.TEXT_ENCODER]),
            _model_file(root, conf[FlavorKey.TOKENIZER_VOCAB]),
            config,
            settings,
        )
    classifier = ZeroShotClassifier(onnx_path, config, settings, limits, text_encoder=text_encoder)
    _log_loaded(root, conf, classifier, variant.reason if variant else None)
    warning = int8_kernels_warning(config)
    if warning:
        _logger.warning(warning)
    return classifier


def verify_setting(value: Any = None, saved: Any = None) -> bool:
    """`model_config`'s verify, then MLFLOW_CLIP_VERIFY, then true. MLflow hands the loader its
    saved model_config merged with the caller's, so the saved value is not an override."""
    if value is None or value == saved:
        value = os.environ.get(VERIFY_ENV, "1")
    if isinstance(value, str):
        value = value.strip().lower() not in ("0", "false", "no", "off")
    if not isinstance(value, bool):
        raise _invalid(f"Received verify={shown(value)}; expected true or false.")
    return value


def _verify(root: Path, mlmodel: Mapping[str, Any], conf: Mapping[str, Any], verify: bool, pinned: str | None) -> None:
    if not verify:
        _logger.warning("mlflow-clip: loading %s without checking it against its manifest (verify is off).", root)
        return
    if recorded_manifest(mlmodel) is None and pinned is None:
        # Saved by mlflow-clip 0.1.0, before manifests: there is nothing to check against.
        _logger.info(
            "mlflow-clip: %s (saved by mlflow-clip %s) has no manifest to check.", root, conf.get(FlavorKey.VERSION)
        )
        return
    started = time.perf_counter()
    try:
        check_manifest(root, mlmodel, pinned)
    except MlflowClipError as e:
        forget_code_dir(root / CODE_DIR_NAME)  # where MLflow loads it, nothing more is imported from it
        raise _invalid(str(e), "INVALID_STATE") from None
    _logger.info(
        "mlflow-clip: %s matches its manifest%s (checked in %.0f ms).",
        root,
        " and the registered version's pin" if pinned else "",
        1000 * (time.perf_counter() - started),
    )


def _model_file(root: Path, name: str) -> Path:
    path = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
        raise _invalid(
            f"The model directory {root} has no file {name!r}, which its MLmodel names.", "RESOURCE_DOES_NOT_EXIST"
        )
    return path


def _log_loaded(root: Path, conf: Mapping[str, Any], classifier: ZeroShotClassifier, chosen: str | None) -> None:
    _configure_logging()
    package = __name__.rpartition(".")[0]
    _logger.info(
        "mlflow-clip: serving %s with %s (%s); %sruntime %s; image resize: %s; JPEG decode: %s",
        root,
        package,
        "the model's own code" if package != "mlflow_clip.serving" else "the installed mlflow_clip",
        f"precision {chosen}; " if chosen else "",
        classifier.session.description,
        native_status().describe(),
        fast_jpeg_status().describe(),
    )


def _configure_logging() -> None:
    """Where nobody configured logging (MLflow's scoring server, a Spark worker), send the
    `mlflow_clip` logs to stderr at INFO, as MLflow does for its own logger."""
    logger = logging.getLogger("mlflow_clip")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class ModelError(MlflowException, MlflowClipError):
    """A model that cannot be saved or loaded as asked (a file that fails its manifest, a missing
    file, bad settings): an `MlflowException` for MLflow, and one of the library's own errors
    for the CLI and for callers catching `MlflowClipError`."""


class ModelNotFoundError(ModelError):
    """No model at the URI: no such registered model, version, alias, run or path."""

    def __init__(self, model_uri: str, reason: str):
        super().__init__(
            f"No model at {model_uri}: {reason}. Check the name and the version or alias (the MLflow UI lists "
            "them), and that MLFLOW_TRACKING_URI points at the right server.",
            error_code=databricks_pb2.RESOURCE_DOES_NOT_EXIST,
        )


def _invalid(message: str, code: str = "INVALID_PARAMETER_VALUE") -> ModelError:
    return ModelError(message, error_code=getattr(databricks_pb2, code))


def _load_pyfunc(path: str, model_config: dict | None = None) -> ClipPyfuncModel:
    """Called by `mlflow.pyfunc.load_model` with the model directory."""
    return ClipPyfuncModel(load_classifier(path, model_config))


class ServingError(MlflowException, MlflowClipError):
    """An error for the client of a served model: a short message, no stack trace.

    MLflow's scoring server prefixes error messages with a repr of the request, which would
    echo (part of) the image bytes back to the client; this error keeps its own message only.
    """

    def __init__(self, message: str, error_code: int = databricks_pb2.INTERNAL_ERROR):
        self._clean_message = message
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._clean_message

    @message.setter
    def message(self, value: str) -> None:  # the scoring server's prefixed copy is dropped
        pass


class ClientInputError(ServingError):
    """A bad request, reported as HTTP 400 / INVALID_PARAMETER_VALUE."""

    def __init__(self, message: str):
        super().__init__(message, error_code=databricks_pb2.INVALID_PARAMETER_VALUE)


class ClipPyfuncModel:
    """The pyfunc face of the classifier: `predict(data, params)`."""

    def __init__(self, classifier: ZeroShotClassifier):
        self.classifier = classifier

    def get_raw_model(self) -> ZeroShotClassifier:
        return self.classifier

    # `data` carries no type hint on purpose: MLflow reads the hint of predict's first argument
    # as an input schema (and warns that Any validates nothing); the signature in MLmodel is the schema.
    def predict(self, data, params: dict[str, Any] | None = None):
        """The output table (a Series of labels for `output="label"`). Called by MLServer's V2
        runtime, the same table in the form its codecs encode, and its errors (see `v2.py`)."""
        if not called_by_mlserver():
            return self._predict(data, params)
        try:
            return v2_table(self._predict(data, params))
        except ServingError as e:
            raise mlserver_error(e) from None

    def _predict(self, data: Any, params: dict[str, Any] | None):
        options = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        output = options["output"]
        if output not in OUTPUT_CHOICES:
            raise ClientInputError(f"Received output={shown(output)}; expected one of {list(OUTPUT_CHOICES)}.")
        truncate = _flag(options["truncate"], "truncate")
        try:
            texts = _text_rows(data)
            if texts is not None:
                return self.classifier.embed_text(texts, truncate=truncate)
            if output == "embedding":
                return self.classifier.embed_images(data, on_error=str(options["on_error"]))
            out = self.classifier.predict(
                data,
                top_k=int(options["top_k"]),
                on_error=str(options["on_error"]),
                classes=options["classes"] or None,
                templates=options["templates"] or None,
                truncate=truncate,
            )
        except InvalidInputError as e:
            raise ClientInputError(str(e)) from None
        except DeadlineExceeded as e:
            raise ServingError(str(e), databricks_pb2.DEADLINE_EXCEEDED) from None
        except ModelFileError as e:
            raise ServingError(str(e)) from None
        return out["label"] if output == "label" else out


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ClientInputError(f"Received {name} of type {type(value).__name__}; expected true or false.")


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
