"""The per-request budget: one dataclass, stored in MLmodel and overridable at load.

Every limit is checked before the work it bounds: header pixel counts before decoding, the
characters of a text before tokenizing it, the prompts of a label set before the text encoder
runs. Each refusal is a 400 that names the row, the figure and the setting. The defaults are
chosen for CLIP, which sees at most a few hundred pixels a side and 77 tokens; the figures
behind them are in docs/decisions/request-budget.md.

    >>> InputLimits(max_rows=100).max_rows
    100
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .errors import SettingsError

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# 50 million pixels: a 48 MP phone photo (8000x6000) still decodes; anything larger is downscaled
# by the client first, as CLIP keeps 224 pixels of its short side.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_ROWS = 10_000  # Spark's default Arrow batch size, so spark_udf works out of the box


@dataclass(frozen=True)
class InputLimits:
    """Safe defaults for untrusted requests; each is a setting in MLmodel or at load time.

    Images: `max_bytes` bounds one encoded image (after base64 decoding) and `max_pixels` its
    width x height as its header declares it; `max_pixels_per_byte` refuses images over
    `ratio_free_pixels` whose header promises more pixels per byte of image data than real
    images have (decompression bombs); `max_image_parts` bounds the segments, chunks, blocks,
    strips or tiles of one file and `max_jpeg_scans` the scans of a progressive JPEG;
    `max_decode_ms` bounds one image's estimated decoding CPU (pixels, scans, bytes per pixel
    and format; see `cost.py`); `max_request_pixels` and `max_request_decode_ms` bound the
    pixels and the estimated decoding CPU of all images of one request. Rows: `max_rows`.
    Text: `max_text_chars` per label, template or text, and `max_request_text_chars` for all
    of a request's texts (every copy counted), checked before tokenizing;
    `max_classes` and `max_templates` per request; `max_prompts` (classes x templates, or texts
    to embed) and `max_prompt_tokens` (their tokens) per request, which bound the text encoder.
    Time: `deadline_seconds` (0: the scoring server's request timeout when serving, none otherwise).
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_rows: int = DEFAULT_MAX_ROWS
    max_classes: int = 1_000
    max_templates: int = 100
    max_pixels_per_byte: int = 1_000
    ratio_free_pixels: int = 4_000_000
    max_request_pixels: int = 150_000_000
    max_image_parts: int = 65_536
    max_jpeg_scans: int = 100
    max_decode_ms: int = 2_000
    max_request_decode_ms: int = 3_000
    max_text_chars: int = 1_000
    max_request_text_chars: int = 50_000
    max_prompts: int = 2_000
    max_prompt_tokens: int = 10_000
    deadline_seconds: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            smallest = 0 if f.name == "deadline_seconds" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise SettingsError(
                    f"InputLimits.{f.name} must be a {'whole number' if smallest == 0 else 'positive int'}; "
                    f"received {value!r}. Fix: pass a number such as {f.default}."
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
            raise SettingsError(f"Received unknown limits {unknown}; expected any of {sorted(cls.names())}.")
        return cls(**data)


DEFAULT_LIMITS = InputLimits()
