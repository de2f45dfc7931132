"""Model names, aliases, experiment names and version arguments, checked before anything else
runs: before a run is opened, a gate runs or anything is written.

A name is accepted only where every place it lands can hold it, on every backend MLflow
supports (MLflow 3's SQL schema; PostgreSQL and MySQL refuse a longer value, both counting
characters; SQLite ignores the width):

- model name (and `--copy-to`), at most 256: `registered_models.name` and every table keyed
  by it are VARCHAR(256).
- alias, at most 200: `registered_model_aliases.alias` is VARCHAR(256) and MLflow checks 255,
  but the lock ticket's tag key `mlflow_clip.lock.<alias>.<32 hex>` must fit
  `registered_model_tags.key`, VARCHAR(250), which MLflow's tag-key check also caps at 250.
- experiment name, at most 256: `experiments.name` is VARCHAR(256) (MLflow's check allows 500).
- version number, at most 2**31 - 1: `model_versions.version` is INTEGER.

What is derived from the names always fits: the history's tag keys
(`mlflow_clip.history.<alias>.<seq>.done`, 35 characters more than the alias) by the alias's
limit, and the run names (`rollback <model> @<alias>`, `runs.name` VARCHAR(250)) by `fit`,
which shortens them with a digest.

Characters: an alias is MLflow's, matched whole (letters, digits, `_` and `-`; not `latest`,
not `v<digits>`). A model name is what MLflow stores and can address as `models:/<name>/<version>`
and `models:/<name>@<alias>`: no `/ : ? @` (the URI parser splits on them), not `.` and not
starting with `..` (MLflow takes those for paths), no quotes or backslashes (registry searches
quote the name), no control, format, private-use or unassigned characters, no whitespace but
spaces, and none at either end (`" clip-zero-shot"` prints like `clip-zero-shot`).
One rule reads a version argument: digits are a version number, `@name` is an alias (so an
all-digit alias is `@3`), any other name an alias.

    >>> [str(parse_version(text)) for text in ("3", "@3", "challenger")]
    ['3', '@3', '@challenger']
    >>> fit("rollback " + "m" * 300 + " @production", 60)
    'rollback mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm~32f456833'
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from mlflow_clip.errors import RegistryNameError
from mlflow_clip.registry.lock import LOCK_KEY_OVERHEAD
from mlflow_clip.serving.errors import shown

MAX_MODEL_NAME_LENGTH = 256  # registered_models.name VARCHAR(256)
MAX_TAG_KEY_LENGTH = 250  # registered_model_tags.key VARCHAR(250), MLflow's check on tag keys
MAX_ALIAS_LENGTH = MAX_TAG_KEY_LENGTH - LOCK_KEY_OVERHEAD  # the lock ticket's key is the longest
MAX_EXPERIMENT_NAME_LENGTH = 256  # experiments.name VARCHAR(256)
MAX_RUN_NAME_LENGTH = 250  # runs.name VARCHAR(250)
MAX_VERSION = 2**31 - 1  # model_versions.version INTEGER
_ALIAS = re.compile(r"[\w\-]+")
_RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)
_URI_CHARACTERS = "/:?@'\"\\"
_DIGEST_CHARS = 9


@dataclass(frozen=True)
class VersionRef:
    number: str | None
    alias: str | None

    def __str__(self) -> str:
        return self.number if self.number is not None else f"@{self.alias}"


def check_model_name(name: str, what: str = "model name", limit: int = MAX_MODEL_NAME_LENGTH) -> str:
    """`name` if MLflow can store and address it on every backend; else RegistryNameError."""
    if not isinstance(name, str) or not name.strip():
        raise RegistryNameError(f"Received an empty {what}; expected a name such as clip-zero-shot.")
    if len(name) > limit:
        raise RegistryNameError(f"Received a {what} of {len(name)} characters; expected at most {limit}.")
    if name != name.strip():
        end = "starts" if name[0].isspace() else "ends"
        raise RegistryNameError(
            f"Received the {what} {shown(name, 60)}, which {end} with whitespace; expected none at either end "
            f"(did you mean {shown(name.strip(), 60)}?)."
        )
    for char in name:
        problem = _character_problem(char)
        if problem:
            raise RegistryNameError(
                f"Received the {what} {shown(name, 60)}, which contains {problem}; expected a name without "
                "/ : ? @ quotes, backslashes, control characters or whitespace other than spaces."
            )
    if name == "." or name.startswith(".."):
        raise RegistryNameError(
            f"Received the {what} {shown(name, 60)}; MLflow refuses '.' and names starting with '..'."
        )
    return name


def _character_problem(char: str) -> str:
    category = unicodedata.category(char)
    if char in _URI_CHARACTERS:
        return repr(char)
    if category[0] == "C" or category in ("Zl", "Zp"):
        kind = {"Cc": "a control", "Cf": "a format", "Co": "a private-use", "Cs": "a surrogate"}.get(
            category, "an unassigned or separator"
        )
        return f"{kind} character (U+{ord(char):04X})"
    if char.isspace() and char != " ":
        return f"whitespace other than a space (U+{ord(char):04X})"
    return ""


def check_alias(alias: str) -> str:
    """`alias` if MLflow accepts it and its lock and history keys fit; else RegistryNameError."""
    if not isinstance(alias, str) or not alias:
        raise RegistryNameError("Received an empty alias; expected a name such as production.")
    if len(alias) > MAX_ALIAS_LENGTH:
        raise RegistryNameError(
            f"Received an alias of {len(alias)} characters; expected at most {MAX_ALIAS_LENGTH} "
            "(the promotion's lock and history are tags named after the alias, and MLflow caps tag names)."
        )
    if not _ALIAS.fullmatch(alias):
        raise RegistryNameError(
            f"Received the alias {shown(alias, 60)}; expected letters, digits, underscores (_) and dashes (-) only."
        )
    if _RESERVED_ALIAS.fullmatch(alias):
        raise RegistryNameError(
            f"Received the alias {shown(alias, 60)}, which MLflow reserves (latest, v<number>); choose another."
        )
    return alias


def check_experiment_name(name: str) -> str:
    """An experiment name a run can be recorded in, on every backend."""
    return check_model_name(name, "experiment name", MAX_EXPERIMENT_NAME_LENGTH)


def check_names(model_name: str, alias: str, copy_to: str | None = None, experiment_name: str | None = None) -> None:
    """Every name a promotion or rollback takes, in the order the command line shows them."""
    check_model_name(model_name)
    check_alias(alias)
    if copy_to:
        check_model_name(copy_to, "--copy-to model name")
    if experiment_name:
        check_experiment_name(experiment_name)


def parse_version(text: str) -> VersionRef:
    """`3` is version 3; `@3` or `challenger` is an alias naming a version."""
    text = str(text).strip()
    if text.startswith("@"):
        return VersionRef(None, check_alias(text[1:]))
    if text.isdigit() and text.isascii():
        number = int(text)
        if not 1 <= number <= MAX_VERSION:
            raise RegistryNameError(
                f"Received the version {shown(text, 30)}; expected a version number from 1 to {MAX_VERSION}."
            )
        return VersionRef(str(number), None)
    if not text:
        raise RegistryNameError("Received an empty version; expected a number (3) or an alias (challenger, @3).")
    return VersionRef(None, check_alias(text))


def fit(text: str, limit: int) -> str:
    """`text`, or when longer than `limit` its start and a digest of all of it (`~` + 9 hex)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    return text[: limit - _DIGEST_CHARS - 1] + "~" + digest
