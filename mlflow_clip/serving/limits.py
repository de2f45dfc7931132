"""The per-request input limits: one dataclass, stored in MLmodel and overridable at load.

>>> InputLimits(max_rows=100).max_rows
100
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default MAX_IMAGE_PIXELS
DEFAULT_MAX_ROWS = 10_000  # Spark's default Arrow batch size, so spark_udf works out of the box


@dataclass(frozen=True)
class InputLimits:
    """Safe defaults for untrusted requests; each is a setting in MLmodel or at load time.

    `max_bytes` bounds one encoded image (after base64 decoding) and `max_pixels` its
    width x height as its header declares it, both checked before decoding; `max_rows` the rows
    of one request; `max_classes` and `max_templates` the labels and templates sent with one.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_rows: int = DEFAULT_MAX_ROWS
    max_classes: int = 1_000
    max_templates: int = 100

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"InputLimits.{f.name} must be a positive int; received {value!r}. "
                    f"Fix: pass a number such as {f.default}."
                )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InputLimits:
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise ValueError(f"Received unknown limits {unknown}; expected any of {sorted(cls.names())}.")
        return cls(**data)


DEFAULT_LIMITS = InputLimits()
