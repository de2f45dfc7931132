"""Registry promotion: gated, auditable, reversible alias moves (`@production`, `@challenger`).

>>> from mlflow_clip.registry import history, promote, rollback
>>> promote("clip-zero-shot", "3", alias="production")  # doctest: +SKIP
>>> rollback("clip-zero-shot", alias="production")  # doctest: +SKIP
>>> [(e.seq, e.event, e.version) for e in history("clip-zero-shot", "production")]  # doctest: +SKIP

names.py      model names, aliases and version arguments, checked first
gates.py      what a version must pass before an alias moves to it
lock.py       mutual exclusion of one alias's moves (a bakery lock with heartbeats)
records.py    the history: one record per event, ordered by sequence, completed after a crash
promotion.py  promote, rollback, history
runs.py       each promotion or rollback as an MLflow run, for the UI
card.py       the model card: the version's description, and the lines moves add to it

The names below are imported when first used, so `mlflow_clip.registry.names` checks a name
without importing MLflow (the CLI refuses a bad name in a fraction of a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow_clip.registry.gates import ACCURACY_TAG, GateResult, GateThresholds, check_gates
    from mlflow_clip.registry.lock import LEASE_SECONDS, LockError
    from mlflow_clip.registry.names import RegistryNameError, parse_version
    from mlflow_clip.registry.promotion import (
        DEFAULT_ALIAS,
        LockSettings,
        PromotionError,
        PromotionResult,
        current_holder,
        history,
        promote,
        resolve_version,
        rollback,
    )
    from mlflow_clip.registry.records import Event, promotion_stack

_HOMES = {
    "gates": ["ACCURACY_TAG", "GateResult", "GateThresholds", "check_gates"],
    "lock": ["LEASE_SECONDS", "LockError"],
    "names": ["RegistryNameError", "parse_version"],
    "promotion": [
        "DEFAULT_ALIAS",
        "LockSettings",
        "PromotionError",
        "PromotionResult",
        "current_holder",
        "history",
        "promote",
        "resolve_version",
        "rollback",
    ],
    "records": ["Event", "promotion_stack"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ACCURACY_TAG",
    "DEFAULT_ALIAS",
    "LEASE_SECONDS",
    "Event",
    "GateResult",
    "GateThresholds",
    "LockError",
    "LockSettings",
    "PromotionError",
    "PromotionResult",
    "RegistryNameError",
    "check_gates",
    "current_holder",
    "history",
    "parse_version",
    "promote",
    "promotion_stack",
    "resolve_version",
    "rollback",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
