"""mlflow-clip's error family: catch `MlflowClipError` to catch every error raised on purpose.

The root lives with the serving code (a model carries it); the library's errors derive from
the same class. Each error keeps its built-in base too (`ValueError` for bad input,
`RuntimeError` for a failed check).

    >>> from mlflow_clip.errors import MlflowClipError
    >>> try:
    ...     mlflow_clip.registry.promote("clip-zero-shot", "3")  # doctest: +SKIP
    ... except MlflowClipError as e:
    ...     print(e)
"""

from mlflow_clip.serving.errors import MlflowClipError, ModelFileError, ModelIntegrityError

__all__ = ["MlflowClipError", "ModelFileError", "ModelIntegrityError"]
