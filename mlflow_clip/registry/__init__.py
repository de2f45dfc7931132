"""Registry promotion: gated, auditable, reversible alias moves (`@production`, `@challenger`).

    >>> from mlflow_clip.registry import promote, rollback
    >>> promote("clip-zero-shot", "3", alias="production")  # doctest: +SKIP
    >>> rollback("clip-zero-shot", alias="production")  # doctest: +SKIP

    gates.py      what a version must pass before an alias moves to it
    promotion.py  moving the alias, its history, and the serialization of concurrent moves
"""

from mlflow_clip.registry.gates import ACCURACY_TAG, GateResult, GateThresholds, check_gates
from mlflow_clip.registry.promotion import (
    DEFAULT_ALIAS,
    PromotionError,
    PromotionResult,
    current_holder,
    promote,
    promotion_stack,
    read_history,
    resolve_version,
    rollback,
)

__all__ = [
    "ACCURACY_TAG",
    "DEFAULT_ALIAS",
    "GateResult",
    "GateThresholds",
    "PromotionError",
    "PromotionResult",
    "check_gates",
    "current_holder",
    "promote",
    "promotion_stack",
    "read_history",
    "resolve_version",
    "rollback",
]
