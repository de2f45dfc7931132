"""Registered-model names, aliases and version arguments, checked before anything else runs.

The rules are MLflow's (an alias is letters, digits, `_` and `-`, at most 255 characters, not
`latest` and not `v<digits>`), plus what mlflow-clip needs to search the registry safely (no
quotes or control characters in a model name). One rule reads a version argument: digits are
a version number, `@name` is an alias (so an all-digit alias is `@3`), any other name an alias.

    >>> [str(parse_version(text)) for text in ("3", "@3", "challenger")]
    ['3', '@3', '@challenger']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.registry.lock import LOCK_KEY_OVERHEAD
from mlflow_clip.serving.errors import shown

MAX_MODEL_NAME_LENGTH = 256  # MLflow's registered_models.name column
# MLflow caps tag keys at 250 characters; the longest tag key an alias goes into is a lock
# ticket's (the history's keys are shorter).
MAX_TAG_KEY_LENGTH = 250
MAX_ALIAS_LENGTH = MAX_TAG_KEY_LENGTH - LOCK_KEY_OVERHEAD
_ALIAS = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)
_BAD_NAME_CHARACTERS = re.compile(r"[/:'\"\\\x00-\x1f\x7f]")


class RegistryNameError(MlflowClipError, ValueError):
    """A model name, alias or version argument is invalid; nothing was run."""


@dataclass(frozen=True)
class VersionRef:
    number: str | None
    alias: str | None

    def __str__(self) -> str:
        return self.number if self.number is not None else f"@{self.alias}"


def check_model_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise RegistryNameError(f"Received an empty {what}; expected the name of a registered model.")
    if len(name) > MAX_MODEL_NAME_LENGTH:
        raise RegistryNameError(
            f"Received a {what} of {len(name)} characters; expected at most {MAX_MODEL_NAME_LENGTH}."
        )
    bad = _BAD_NAME_CHARACTERS.search(name)
    if bad:
        raise RegistryNameError(
            f"Received the {what} {shown(name, 60)}, which contains {_describe(bad.group())}; expected a name without "
            "slashes, colons, quotes, backslashes or control characters."
        )
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not alias:
        raise RegistryNameError("Received an empty alias; expected a name such as production.")
    if len(alias) > MAX_ALIAS_LENGTH:
        raise RegistryNameError(
            f"Received an alias of {len(alias)} characters; expected at most {MAX_ALIAS_LENGTH} "
            "(the promotion's lock and history are tags named after the alias, and MLflow caps tag names)."
        )
    if not _ALIAS.match(alias):
        raise RegistryNameError(
            f"Received the alias {shown(alias, 60)}; expected letters, digits, underscores (_) and dashes (-) only."
        )
    if _RESERVED_ALIAS.match(alias):
        raise RegistryNameError(
            f"Received the alias {shown(alias, 60)}, which MLflow reserves (latest, v<number>); choose another."
        )
    return alias


def parse_version(text: str) -> VersionRef:
    """`3` is version 3; `@3` or `challenger` is an alias naming a version."""
    text = str(text).strip()
    if text.startswith("@"):
        return VersionRef(None, check_alias(text[1:]))
    if text.isdigit() and text.isascii():
        return VersionRef(str(int(text)), None)
    if not text:
        raise RegistryNameError("Received an empty version; expected a number (3) or an alias (challenger, @3).")
    return VersionRef(None, check_alias(text))


def _describe(char: str) -> str:
    return "a control character" if ord(char) < 32 or ord(char) == 127 else repr(char)
