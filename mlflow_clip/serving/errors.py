"""One error family: every error mlflow-clip raises on purpose derives from `MlflowClipError`.

Each error also keeps the built-in base it always had (`ValueError` for bad input,
`RuntimeError` for a failed check), so code that catches those keeps working.

    >>> issubclass(ModelIntegrityError, MlflowClipError) and issubclass(ModelIntegrityError, RuntimeError)
    True
"""

from __future__ import annotations


class MlflowClipError(Exception):
    """The root of mlflow-clip's errors; the message names the problem and the fix."""


class ModelIntegrityError(MlflowClipError, RuntimeError):
    """A model directory does not match the manifest written when it was saved."""


class ModelFileError(MlflowClipError, RuntimeError):
    """A file of the model directory cannot be used (missing, unreadable, or unsafe)."""


def shown(value: object, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: how an error names a value it refuses without
    echoing a request back (under 40 characters of it by default)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
