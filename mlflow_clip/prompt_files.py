"""`@file` arguments: class names and templates read from a file, on the export and CLI side.

A served model reads no files; `mlflow_clip.serving.prompts` takes names and templates as text.
The exporter and the CLI expand `@path` here first (one class or template per line, UTF-8) and
hand the lines on, so the model records the list itself.

    >>> parse_classes("a red circle, a blue square")
    ['a red circle', 'a blue square']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mlflow_clip.errors import PromptError
from mlflow_clip.serving import prompts

__all__ = ["locate", "parse_classes", "resolve_templates"]


def parse_classes(spec: str | Sequence[str]) -> list[str]:
    """`prompts.parse_classes`, plus `@file` (one class per line, UTF-8; commas kept)."""
    if isinstance(spec, str) and spec.startswith("@"):
        text, path = _read_text(spec[1:], "class")
        lines = text.splitlines()
        # A trailing newline or blank lines around the list are not class names.
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        return prompts.parse_classes(lines, source=f"file {path}")
    return prompts.parse_classes(spec)


def resolve_templates(spec: str | Sequence[str]) -> list[str]:
    """`prompts.resolve_templates`, plus `@file` (one template with {} per line; `#` comments)."""
    if isinstance(spec, str) and spec.strip().startswith("@"):
        text, path = _read_text(spec.strip()[1:], "template")
        lines = [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]
        return prompts.resolve_templates(lines, source=f"file {path}")
    return prompts.resolve_templates(spec)


def locate(text: str) -> tuple[Path, list[Path]]:
    """The file an `@path` names, and the directories searched for it. A relative path is looked
    up in the caller's directory first: `mlflow run` starts the job in the project's directory,
    and keeps the caller's in `$PWD`; then in the current directory."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return path, [path.parent]
    searched = [Path.cwd()]
    caller = os.environ.get("PWD")
    if caller and Path(caller).is_dir() and Path(caller).resolve() != Path.cwd().resolve():
        searched.insert(0, Path(caller))
    for folder in searched:
        if (folder / path).is_file():
            return folder / path, searched
    return searched[-1] / path, searched


def _read_text(spec: str, what: str) -> tuple[str, Path]:
    path, searched = locate(spec)
    try:
        return path.read_text(encoding="utf-8"), path
    except (FileNotFoundError, IsADirectoryError) as e:
        where = " and ".join(str(folder) for folder in searched)
        raise PromptError(f"The {what} file {spec} was not found (looked in {where}); check the path after '@'.") from e
    except UnicodeDecodeError as e:
        raise PromptError(
            f"The {what} file {path} is not valid UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8."
        ) from e
