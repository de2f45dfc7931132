"""The serving side of mlflow-clip's error family: every error a served model raises on purpose.

A model carries this module in its `code/` folder, so it imports nothing of `mlflow_clip`;
`mlflow_clip.errors` re-exports every class here and adds the library's own. The hierarchy (each
error also keeps its built-in base, so code that catches `ValueError` keeps working):

    MlflowClipError
    ├── ModelIntegrityError (RuntimeError)   a model directory does not match its manifest
    ├── ModelFileError (RuntimeError)        a model file missing, unreadable or unsafe
    ├── MissingFileError (FileNotFoundError)  a file a model or a call needs is not there
    ├── SettingsError (ValueError)           a runtime, preprocessing, limit or text setting out of range
    ├── ModelConfigError (ValueError)        a model file or configuration not as its exporter writes it
    ├── RuntimeUnavailableError (ImportError)  the chosen runtime is not installed
    ├── PromptError (ValueError)             bad class names or templates
    ├── TextInputError (ValueError)          a text that cannot be tokenized
    ├── InvalidInputError (ValueError)       a request the model cannot score (rows named)
    ├── ImageInputError (ValueError)         one image input that cannot be used
    ├── TooManyParts (ValueError)            an image file with more parts than allowed (internal)
    ├── FastDecodeRefused (ValueError)       simplejpeg will not decode a JPEG; Pillow does (internal)
    ├── DeadlineExceeded (TimeoutError)      the request ran past its deadline
    └── InternalError (RuntimeError)         a broken invariant: a bug to report, not bad input

`ModelError` (and its `ModelNotFoundError`), `ServingError` and `ClientInputError` are
`MlflowException`s too, so they live with the MLflow loader (`loader.py`), the one serving module
that imports MLflow.

    >>> issubclass(ModelIntegrityError, MlflowClipError) and issubclass(ModelIntegrityError, RuntimeError)
    True
"""

from __future__ import annotations

from collections.abc import Sequence


class MlflowClipError(Exception):
    """The root of mlflow-clip's errors; the message names the problem and the fix."""


class ModelIntegrityError(MlflowClipError, RuntimeError):
    """A model directory does not match the manifest written when it was saved."""


class ModelFileError(MlflowClipError, RuntimeError):
    """A file of the model directory cannot be used (missing, unreadable, or unsafe)."""


class MissingFileError(MlflowClipError, FileNotFoundError):
    """A file a model or a call needs is not there; the message names it and where to get it."""


class SettingsError(MlflowClipError, ValueError):
    """A runtime, preprocessing, limit or text setting out of range; the message names the
    setting, the value received and what it accepts."""


class ModelConfigError(MlflowClipError, ValueError):
    """A model's own files or configuration are not what its exporter writes (metadata missing, a
    tokenizer file that disagrees with the config); the message says how to get a good copy."""


class FastDecodeRefused(MlflowClipError, ValueError):
    """simplejpeg would not decode this JPEG as Pillow does; the decoder falls back to Pillow
    (internal: never reaches a caller)."""


class InternalError(MlflowClipError, RuntimeError):
    """An invariant of mlflow-clip itself broke (not the input's fault): report it as a bug."""


class TextInputError(MlflowClipError, ValueError):
    """A text that cannot be tokenized; the message names its index and the fix."""


class TooManyParts(MlflowClipError, ValueError):
    """The walk passed `max_parts`; `what` names the parts counted."""

    def __init__(self, count: int, what: str):
        super().__init__(f"more than {count} {what}")
        self.count, self.what = count, what


class DeadlineExceeded(MlflowClipError, TimeoutError):
    """The request ran past its deadline; its work was stopped."""


class RuntimeUnavailableError(MlflowClipError, ImportError):
    """The model needs a runtime this environment lacks; the message names the fix."""


class InvalidInputError(MlflowClipError, ValueError):
    """A request the model cannot score; `rows` lists (row index, reason) pairs."""

    def __init__(self, message: str, rows: Sequence[tuple[int, str]] = ()):
        super().__init__(message)
        self.rows = list(rows)


class PromptError(MlflowClipError, ValueError):
    """Bad class names or templates; the message says which one and how to fix it."""


SEND_IMAGE_FIX = (
    "send the bytes of a JPEG, PNG, WebP, BMP, GIF or TIFF file, raw or base64-encoded "
    "(see mlflow_clip.client.encode_image)"
)


class ImageInputError(MlflowClipError, ValueError):
    """One image input could not be used: ``reason`` says why, ``fix`` what to send instead.

    Messages never contain the input itself, at most its type and length.
    """

    def __init__(self, reason: str, fix: str = SEND_IMAGE_FIX) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
        self.fix = fix

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.reason, self.fix))


def shown(value: object, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: how an error names a value it refuses without
    echoing a request back (under 40 characters of it by default)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
