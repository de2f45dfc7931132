"""mlflow-clip's error family: catch `MlflowClipError` to catch every error raised on purpose.

Every error class is defined here or, for the errors a served model raises, in
`mlflow_clip.serving.errors` (a model carries that module and cannot import this one), and
re-exported here. Each error keeps its built-in base too, so `except ValueError` keeps working.
`docs/errors.md` says when each is raised and the fix.

    MlflowClipError
    ├── ModelIntegrityError (RuntimeError)     a model directory does not match its manifest
    ├── ModelFileError (RuntimeError)          a model file missing, unreadable or unsafe
    ├── MissingFileError (FileNotFoundError)   a file a model or a call needs is not there
    ├── SettingsError (ValueError)             a runtime, preprocessing, limit or text setting out of range
    ├── ModelConfigError (ValueError)          a model file or configuration not as its exporter writes it
    ├── RuntimeUnavailableError (ImportError)  the chosen runtime is not installed
    ├── PromptError (ValueError)               bad class names or templates
    ├── TextInputError (ValueError)            a text that cannot be tokenized
    ├── InvalidInputError (ValueError)         a request the model cannot score (rows named)
    ├── ImageInputError (ValueError)           one image input that cannot be used
    ├── TooManyParts (ValueError)              an image with more parts than allowed (internal)
    ├── FastDecodeRefused (ValueError)         simplejpeg will not decode a JPEG; Pillow does (internal)
    ├── DeadlineExceeded (TimeoutError)        the request ran past its deadline
    ├── InternalError (RuntimeError)           a broken invariant: a bug to report, not bad input
    ├── ModelError (MlflowException)           a model that cannot be saved or loaded as asked
    │   └── ModelNotFoundError                 no model at the URI
    ├── ServingError (MlflowException)         an error for a served model's client, no stack trace
    │   └── ClientInputError                   a bad request (HTTP 400)
    ├── SpecError (ValueError)                 an export argument is invalid
    │   └── WeightsError                       the CLIP weights named cannot be had
    ├── SourceError (ValueError)               a model spec, checkpoint or architecture is invalid
    ├── CheckpointError (ValueError)           the CLIP model could not be found or loaded
    ├── ConfigError (ValueError)               an open_clip config the export cannot follow
    ├── HfFolderError (ValueError)             a Hugging Face folder that cannot be exported
    ├── PrecisionError (ValueError)            the precision transform cannot be applied
    ├── GraphError (RuntimeError)              the ONNX graph could not be built as asked
    ├── ParityError (RuntimeError)             a parity gate failed; nothing was registered
    ├── EvaluationError (ValueError)           the evaluation cannot start
    ├── RegistryNameError (ValueError)         a model name, alias or version argument is invalid
    ├── LockError (RuntimeError)               an alias lock not taken in time, or lost
    ├── HistoryError (RuntimeError)            the promotion history cannot be read or extended
    ├── PromotionError (RuntimeError)          a gate failed; the alias did not move
    ├── ProbeError (RuntimeError)              a version did not load or predict in a fresh process
    ├── PortInUseError (OSError)               the port asked for is taken
    ├── BenchmarkInputError (ValueError)       bad `mlflow-clip benchmark` input
    ├── PredictError (ValueError)              input, output or options `mlflow-clip predict` cannot use
    ├── RequestError (ValueError)              a V2 (MLServer) request the model cannot take as sent
    └── UsageError (ValueError)                a library function called with a value it does not accept

The four `MlflowException`s (`ModelError`, `ModelNotFoundError`, `ServingError`,
`ClientInputError`) are imported from MLflow's side on first use, so that importing this module
(as the CLI does to check a name before anything slow) does not import MLflow.

    >>> from mlflow_clip.errors import MlflowClipError
    >>> try:
    ...     mlflow_clip.registry.promote("clip-zero-shot", "3")  # doctest: +SKIP
    ... except MlflowClipError as e:
    ...     print(e)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlflow_clip.serving.errors import (
    DeadlineExceeded,
    FastDecodeRefused,
    ImageInputError,
    InternalError,
    InvalidInputError,
    MissingFileError,
    MlflowClipError,
    ModelConfigError,
    ModelFileError,
    ModelIntegrityError,
    PromptError,
    RuntimeUnavailableError,
    SettingsError,
    TextInputError,
    TooManyParts,
)


class GraphError(MlflowClipError, RuntimeError):
    """The ONNX graph could not be built as asked (a rename failed, a wrong output shape)."""


class UsageError(MlflowClipError, ValueError):
    """A library function was called with a value it does not accept; the message lists what it does."""


class SpecError(MlflowClipError, ValueError):
    """An export argument is invalid; the message names it and what it accepts."""


class WeightsError(SpecError):
    """The CLIP weights an export names cannot be had: no such file, or a name neither cached nor
    downloadable. The message says how to fix it."""


class SourceError(MlflowClipError, ValueError):
    """A model spec, checkpoint or architecture is invalid; the message says what is accepted."""


class CheckpointError(MlflowClipError, ValueError):
    """The CLIP model could not be found or loaded; the message says how to fix it."""


class ConfigError(MlflowClipError, ValueError):
    """An open_clip config the export cannot follow; the message says why."""


class HfFolderError(MlflowClipError, ValueError):
    """A Hugging Face folder that cannot be exported; the message says what is missing or why."""


class PrecisionError(MlflowClipError, ValueError):
    """The precision transform cannot be applied; the message says why and what to do."""


class ParityError(MlflowClipError, RuntimeError):
    """A parity gate failed; nothing was registered."""


class EvaluationError(MlflowClipError, ValueError):
    """The evaluation cannot start (bad data folder, CSV, labels or reference); the message says
    what was received and how to fix it."""


class RegistryNameError(MlflowClipError, ValueError):
    """A model name, alias or version argument is invalid; nothing was run."""


class LockError(MlflowClipError, RuntimeError):
    """The lock could not be taken in time, or was lost; nothing was written under it."""


class HistoryError(MlflowClipError, RuntimeError):
    """The history cannot be read or extended consistently."""


class PromotionError(MlflowClipError, RuntimeError):
    """A gate failed or the request was invalid; the alias did not move. `.result`, when set,
    carries the gates that ran (a `mlflow_clip.registry.PromotionResult`)."""

    def __init__(self, message: str, result: object | None = None):
        super().__init__(message)
        self.result = result


class ProbeError(MlflowClipError, RuntimeError):
    """The version could not be loaded or could not predict in a fresh serving process."""


class PortInUseError(MlflowClipError, OSError):
    """The port asked for (or every default one) is taken; the message says which."""


class BenchmarkInputError(MlflowClipError, ValueError):
    """Bad `mlflow-clip benchmark` input; the message names the value and the fix."""


class PredictError(MlflowClipError, ValueError):
    """Input, output or options `mlflow-clip predict` cannot use; the message names the fix."""


class RequestError(MlflowClipError, ValueError):
    """A V2 request the model cannot take as sent (HTTP 400): the message names the fix."""


if TYPE_CHECKING:
    from mlflow_clip.serving.loader import ClientInputError, ModelError, ModelNotFoundError, ServingError

# The MLflowExceptions, defined with the MLflow loader: imported when first asked for.
_FROM_LOADER = ("ClientInputError", "ModelError", "ModelNotFoundError", "ServingError")


def __getattr__(name: str) -> Any:
    if name in _FROM_LOADER:
        from mlflow_clip.serving import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BenchmarkInputError",
    "CheckpointError",
    "ClientInputError",
    "ConfigError",
    "DeadlineExceeded",
    "EvaluationError",
    "FastDecodeRefused",
    "GraphError",
    "HfFolderError",
    "HistoryError",
    "ImageInputError",
    "InternalError",
    "InvalidInputError",
    "LockError",
    "MissingFileError",
    "MlflowClipError",
    "ModelConfigError",
    "ModelError",
    "ModelFileError",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "ParityError",
    "PortInUseError",
    "PredictError",
    "PrecisionError",
    "ProbeError",
    "PromotionError",
    "PromptError",
    "RegistryNameError",
    "RequestError",
    "RuntimeUnavailableError",
    "ServingError",
    "SettingsError",
    "SourceError",
    "SpecError",
    "TextInputError",
    "TooManyParts",
    "UsageError",
    "WeightsError",
]
