"""The model's signature: its inputs, its parameters, and every output it can return, typed.

One table (`OUTPUTS`) names each output column, its type and the output modes that return it;
the signature `save_model` writes is built from it, and so is the set of columns a request
gets (`output_columns`), which Spark's result types and MLServer's tensors are derived from.
The probabilities, scores and embeddings are the graph's float32 values: `float` in the
signature, FP32 tensors over the V2 protocol, `float`/`array<float>` in Spark.

    >>> output_columns("full", top_k=2)
    ('label', 'score', 'probabilities', 'top_labels', 'top_scores', 'error')
    >>> output_columns("embedding")
    ('embedding', 'error')
"""

from __future__ import annotations

from typing import Any

PARAM_DEFAULTS: dict[str, Any] = {
    "top_k": 0,
    "on_error": "raise",
    "output": "full",
    "classes": [],
    "templates": "",
    "truncate": False,
}
# output="label" returns the labels alone (a Series), for tools that expect one prediction per row;
# output="embedding" returns one normalized image embedding per row (column `embedding`).
OUTPUT_CHOICES = ("full", "label", "embedding")
IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"

# (column, element type, is a list per row, the modes that return it). "top_k" is the full
# table with top_k > 0; "text" a request with a `text` column (text embeddings).
OUTPUTS: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    ("label", "string", False, ("full", "top_k", "label")),
    ("score", "float", False, ("full", "top_k")),
    ("probabilities", "float", True, ("full", "top_k")),
    ("top_labels", "string", True, ("top_k",)),
    ("top_scores", "float", True, ("top_k",)),
    ("embedding", "float", True, ("embedding", "text")),
    ("error", "string", False, ("full", "top_k", "embedding", "text")),
)


def output_mode(output: str = "full", top_k: int = 0, text: bool = False) -> str:
    """The mode of a request: full, top_k, label, embedding or text."""
    if text:
        return "text"
    if output == "full" and top_k:
        return "top_k"
    return output


def output_columns(output: str = "full", top_k: int = 0, text: bool = False) -> tuple[str, ...]:
    """The columns a request returns, in order (`output="label"` returns a Series: ('label',))."""
    mode = output_mode(output, top_k, text)
    return tuple(name for name, _, _, modes in OUTPUTS if mode in modes)


def default_signature():
    """Input: a binary `image` column (or a `text` column, for text embeddings); params `top_k`,
    `on_error`, `output`, `classes`, `templates` and `truncate`; outputs: every column any of
    those requests returns (`OUTPUTS`), each optional, since each request returns some of them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema(
        [
            ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
            ColSpec(DataType.string, TEXT_COLUMN, required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(Array(DataType[kind]) if is_list else DataType[kind], name, required=False)
            for name, kind, is_list, _ in OUTPUTS
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("top_k", DataType.long, PARAM_DEFAULTS["top_k"]),
            ParamSpec("on_error", DataType.string, PARAM_DEFAULTS["on_error"]),
            ParamSpec("output", DataType.string, PARAM_DEFAULTS["output"]),
            # Labels chosen per request (empty: the baked classes), and their templates: a preset
            # (none, photo, ensemble) or one template with {} (empty: the model's own templates).
            ParamSpec("classes", DataType.string, PARAM_DEFAULTS["classes"], (-1,)),
            ParamSpec("templates", DataType.string, PARAM_DEFAULTS["templates"]),
            # Keep the first 77 tokens of labels and texts longer than CLIP's context, as CLIP does;
            # by default they are refused (cutting them can silently change what they mean).
            ParamSpec("truncate", DataType.boolean, PARAM_DEFAULTS["truncate"]),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
